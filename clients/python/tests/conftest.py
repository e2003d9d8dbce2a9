"""Harness for the Python client's tests: real valetd processes on loopback, each in a temp dir with
its config, seal key and credential files, stopped when the test ends (also when it fails). The
binaries come from the Rust build (`VALET_BINARIES`, default `target/debug` of the repository)."""

from __future__ import annotations

import datetime
import hashlib
import json
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
OTHER_AGENT_KEY = "vk_test_other_agent_91ab77"
OPERATOR_KEY = "vk_test_operator_c0ffee42"
ADMIN_KEY = "vk_test_admin_5eed1e55"
SEAL_KEY = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80="
RAILWAY_ROOT_SECRET = "railway-ROOT-secret-7a61c0b2d9e84f35"
GITHUB_ROOT_SECRET = "ghp_ROOTsecretTokenNeverLeaves0451"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


#: What the Python suite adds to the shared standard config: a scope that needs an operator's
#: approval, held by the agent.
PYTHON_SCOPES = """
[[scope]]
name = "prod-approval"
credential = "railway"
environment = "production"
audience = "railway"
default_ttl = "5m"
max_ttl = "10m"
[scope.approval]
approvers = ["role:operator"]
timeout = "2m"
confirm = "environment"
"""


def standard_config(extra: str = "", server_extra: str = "", agent_scopes=()) -> str:
    """The end-to-end suites' shared config (tests/standard.toml), as the Rust harness fills it,
    with the Python suite's scope, `server_extra` in [server], more scopes for the agent, and
    `extra` appended."""
    template = (REPOSITORY / "tests" / "standard.toml").read_text()
    for placeholder, key in (
        ("AGENT_KEY", AGENT_KEY),
        ("OTHER_AGENT_KEY", OTHER_AGENT_KEY),
        ("OPERATOR_KEY", OPERATOR_KEY),
        ("ADMIN_KEY", ADMIN_KEY),
    ):
        template = template.replace(f"@{placeholder}_SHA256@", sha256_hex(key))
    scopes = ["deploy-staging", "limited", "short", "prod-approval", *agent_scopes]
    agent = 'scopes = ["deploy-staging", "limited", "short"]'
    assert agent in template, "the shared config's agent scopes changed: update the Python harness"
    template = template.replace(agent, f"scopes = {json.dumps(scopes)}", 1)
    if server_extra:
        template = template.replace('grant_retention = "1h"\n', f'grant_retention = "1h"\n{server_extra}\n', 1)
    return f"{template}{PYTHON_SCOPES}{extra}\n"


class Valetd:
    """A running valetd; `server` is its gRPC address as a client URL, `gateway` its gateway's."""

    def __init__(self, process: subprocess.Popen, scheme: str) -> None:
        self.process = process
        self.lines: List[str] = []
        self.address: Optional[str] = None
        self.gateway: Optional[str] = None
        self.console: Optional[str] = None
        self._ready = threading.Event()
        self._scheme = scheme
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if match := re.search(r"gateway listening on (\S+)", line):
                self.gateway = match.group(1)
            if match := re.search(r"console listening on \S+ .*url=(\S+)", line):
                self.console = match.group(1)
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


#: The workload identity the mutual TLS tests' client certificate carries.
SPIFFE_ID = "spiffe://example.org/ci/builder"


def p256_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def make_ca(name: str):
    """A throwaway CA: (certificate, key, name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = p256_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key, subject


def issue_certificate(directory: pathlib.Path, stem: str, ca, names, usage) -> None:
    """A certificate signed by `ca` for `names` (x509 general names), written as STEM.crt/.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    ca_certificate, ca_key, ca_name = ca
    now = datetime.datetime.now(datetime.timezone.utc)
    key = p256_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / f"{stem}.crt").write_bytes(certificate.public_bytes(pem))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def certificates(directory: pathlib.Path) -> None:
    """A server CA with valetd's certificate (127.0.0.1, localhost), and a workload CA with a
    client certificate for a SPIFFE ID."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    server_ca = make_ca("valet test CA")
    (directory / "ca.crt").write_bytes(server_ca[0].public_bytes(serialization.Encoding.PEM))
    issue_certificate(
        directory,
        "server",
        server_ca,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    workload_ca = make_ca("workload CA")
    (directory / "client-ca.crt").write_bytes(workload_ca[0].public_bytes(serialization.Encoding.PEM))
    issue_certificate(
        directory,
        "builder",
        workload_ca,
        [x509.UniformResourceIdentifier(SPIFFE_ID)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )


sys.path.insert(0, str(pathlib.Path(__file__).parent))
