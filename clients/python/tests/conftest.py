"""Harness for the Python client's tests: real valetd processes on loopback, each in a temp dir with
its config, seal key and credential files, stopped when the test ends (also when it fails). The
binaries come from the Rust build (`VALET_BINARIES`, default `target/debug` of the repository)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import threading
from typing import Dict, List, Optional

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]
BINARIES = pathlib.Path(os.environ.get("VALET_BINARIES", REPOSITORY / "target" / "debug"))
#: The suite's own tools venv (moto, for the AWS scenario), installed by scripts/test.sh.
TOOLS_VENV = REPOSITORY / "var" / "venv"

AGENT_KEY = "vk_test_agent_3b1f0c6e5d4a"
OPERATOR_KEY = "vk_test_operator_c0ffee42"
ADMIN_KEY = "vk_test_admin_5eed1e55"
SEAL_KEY = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80="
RAILWAY_ROOT_SECRET = "railway-ROOT-secret-7a61c0b2d9e84f35"
GITHUB_ROOT_SECRET = "ghp_ROOTsecretTokenNeverLeaves0451"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def standard_config(extra: str = "", server_extra: str = "") -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"
grant_retention = "1h"
{server_extra}

[seal]
key_file = "seal.key"

[audit]
path = "audit/audit.jsonl"

[[credential]]
name = "railway"
file = "railway.secret"

[[credential]]
name = "github"
env = "VALET_TEST_GITHUB_TOKEN"

[[scope]]
name = "deploy-staging"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project]
pattern = "[a-z][a-z0-9-]{{0,31}}"

[[scope]]
name = "short"
credential = "github"
environment = "ci"
audience = "github"
default_ttl = "3s"
max_ttl = "9s"

[[scope]]
name = "prod-db"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
approvers = ["role:operator"]
timeout = "2m"
confirm = "environment"

[[principal]]
name = "agent"
roles = ["agent"]
key_sha256 = "{sha256_hex(AGENT_KEY)}"
scopes = ["deploy-staging", "short", "prod-db"]

[[principal]]
name = "operator"
roles = ["operator"]
key_sha256 = "{sha256_hex(OPERATOR_KEY)}"

[[principal]]
name = "admin"
roles = ["admin"]
key_sha256 = "{sha256_hex(ADMIN_KEY)}"
{extra}
"""


class Valetd:
    """A running valetd; `server` is its gRPC address as a client URL, `gateway` its gateway's."""

    def __init__(self, process: subprocess.Popen, scheme: str) -> None:
        self.process = process
        self.lines: List[str] = []
        self.address: Optional[str] = None
        self.gateway: Optional[str] = None
        self._ready = threading.Event()
        self._scheme = scheme
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if match := re.search(r"gateway listening on (\S+)", line):
                self.gateway = match.group(1)
            if match := re.search(r"valetd listening on (\S+)", line):
                self.address = match.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> "Valetd":
        if not self._ready.wait(30) or self.address is None:
            self.stop()
            raise AssertionError("valetd did not start:\n" + "".join(self.lines))
        return self

    @property
    def server(self) -> str:
        return f"{self._scheme}://{self.address}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return "".join(self.lines)


class Deployment:
    """A directory with a config and everything it points at."""

    def __init__(self, directory: pathlib.Path, config: str) -> None:
        self.directory = directory
        (directory / "valet.toml").write_text(config)
        (directory / "seal.key").write_text(SEAL_KEY + "\n")
        (directory / "railway.secret").write_text(RAILWAY_ROOT_SECRET + "\n")
        self.running: List[Valetd] = []

    def path(self, relative: str) -> pathlib.Path:
        return self.directory / relative

    def start(self, scheme: str = "http", environment: Optional[Dict[str, str]] = None) -> Valetd:
        binary = BINARIES / "valetd"
        if not binary.exists():
            raise AssertionError(f"{binary} is missing: build it first (cargo build --workspace --bins)")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "VALET_TEST_GITHUB_TOKEN": GITHUB_ROOT_SECRET,
            "RUST_LOG": "info",
        }
        env.update(environment or {})
        process = subprocess.Popen(
            [str(binary), "--config", str(self.path("valet.toml"))],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        valetd = Valetd(process, scheme).wait_ready()
        self.running.append(valetd)
        return valetd

    def stop(self) -> None:
        for valetd in self.running:
            valetd.stop()


@pytest.fixture
def deploy(tmp_path):
    """`deploy(config)` → a Deployment in a fresh temp dir; every valetd it starts is stopped at
    the end of the test."""
    deployments: List[Deployment] = []

    def make(config: Optional[str] = None) -> Deployment:
        directory = tmp_path / f"deployment-{len(deployments)}"
        directory.mkdir()
        deployment = Deployment(directory, config or standard_config())
        deployments.append(deployment)
        return deployment

    yield make
    for deployment in deployments:
        deployment.stop()


@pytest.fixture
def valetd(deploy):
    """valetd with the standard config."""
    return deploy().start()


def client_for(valetd: Valetd, key: str, **settings):
    import valet

    return valet.Client(valet.Settings(server=valetd.server, credential=valet.PrincipalKey(key), **settings))


def tools_python() -> pathlib.Path:
    python = TOOLS_VENV / "bin" / "python"
    if not python.exists():
        raise AssertionError(f"{python} is missing: run ./scripts/test.sh, which installs the test tools")
    return python


sys.path.insert(0, str(pathlib.Path(__file__).parent))
