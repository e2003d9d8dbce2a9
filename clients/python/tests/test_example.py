"""The runnable example (clients/python/examples/task_scope.py) against valetd on the README's
development config (deploy/examples/valet.toml with --dev), on a free port."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import REPOSITORY, Valetd, BINARIES


def test_the_example_runs_against_the_development_config(tmp_path):
    examples = tmp_path / "examples"
    shutil.copytree(REPOSITORY / "deploy" / "examples", examples, ignore=shutil.ignore_patterns("var"))
    config = examples / "valet.toml"
    # Every listener on a free port: a valetd of the README's tour may hold the example's.
    config.write_text(re.sub(r'(listen = )"127\.0\.0\.1:\d+"', r'\1"127.0.0.1:0"', config.read_text()))
    process = subprocess.Popen(
        [str(BINARIES / "valetd"), "--config", str(config), "--dev"],
        cwd=examples,
        env={"PATH": os.environ.get("PATH", "")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    valetd = Valetd(process, "http").wait_ready()
    try:
        environment = {
            "PATH": os.environ.get("PATH", ""),
            "VALET_SERVER": valetd.server,
            "VALET_KEY": (examples / "demo-keys" / "agent.key").read_text().strip(),
        }
        run = subprocess.run(
            [sys.executable, str(REPOSITORY / "clients" / "python" / "examples" / "task_scope.py")],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r"tool: token for grant \w+, audience railway", run.stdout), run.stdout
        assert "the token now: active=False" in run.stdout and "task ended" in run.stdout, run.stdout
        assert environment["VALET_KEY"] not in run.stdout + run.stderr
    finally:
        valetd.stop()
