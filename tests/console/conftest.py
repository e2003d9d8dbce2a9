"""Harness for the web console's browser tests: the Python client suite's valetd harness (real
valetd processes on loopback), a `valet console --print-url` helper, and Playwright driving
Debian's Chromium (Playwright cannot download browsers here; `CHROMIUM` overrides the path)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]

# The client suite's harness, loaded under its own name (both files are called conftest.py).
_spec = importlib.util.spec_from_file_location("client_harness", REPOSITORY / "clients" / "python" / "tests" / "conftest.py")
client_harness = importlib.util.module_from_spec(_spec)
sys.modules["client_harness"] = client_harness
_spec.loader.exec_module(client_harness)

deploy = client_harness.deploy  # the fixture
standard_config = client_harness.standard_config
client_for = client_harness.client_for
AGENT_KEY = client_harness.AGENT_KEY
ADMIN_KEY = client_harness.ADMIN_KEY
sha256_hex = client_harness.sha256_hex
OPERATOR_KEY = client_harness.OPERATOR_KEY
BINARIES = client_harness.BINARIES
certificates = client_harness.certificates

#: Where the tests write their screenshots: under target/ (tests write nothing tracked), or where
#: VALET_SCREENSHOTS points; `./scripts/screenshots.sh` points it at docs/console to regenerate
#: the ones the docs show.
SCREENSHOTS = pathlib.Path(os.environ.get("VALET_SCREENSHOTS") or REPOSITORY / "target" / "console-screenshots")


def console_config(session_ttl: str = "", tls: bool = False) -> str:
    server = 'console_listen = "127.0.0.1:0"'
    if session_ttl:
        server += f'\nconsole_session_ttl = "{session_ttl}"'
    if tls:
        server += '\ntls_cert_file = "server.crt"\ntls_key_file = "server.key"'
    return standard_config(server_extra=server)


def login_url(valetd, key: str = OPERATOR_KEY, ca_file: str = "") -> tuple:
    """What `valet console --json` answers for the principal of `key`: the login URL and the code
    its page asks for."""
    environment = {"PATH": os.environ.get("PATH", ""), "VALET_SERVER": valetd.server, "VALET_KEY": key}
    if ca_file:
        environment["VALET_CA_FILE"] = ca_file
    answer = subprocess.run(
        [str(BINARIES / "valet"), "console", "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert answer.returncode == 0, answer.stderr
    login = json.loads(answer.stdout)
    return login["url"], login["code"]


def valet_cli(valetd, *arguments: str, key: str = OPERATOR_KEY) -> subprocess.CompletedProcess:
    """`valet ARGUMENTS` as the principal of `key`."""
    environment = {"PATH": os.environ.get("PATH", ""), "VALET_SERVER": valetd.server, "VALET_KEY": key}
    return subprocess.run(
        [str(BINARIES / "valet"), *arguments], env=environment, capture_output=True, text=True, timeout=30
    )


def audit_records(deployment) -> list:
    path = deployment.path("audit/audit.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not pathlib.Path(path).exists():
        raise AssertionError(f"Chromium is missing at {path}: ./scripts/test.sh installs Debian's chromium package")
    return path


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context
    context.close()
