"""One agent tool call wrapped in a task scope, against the README's development valetd:

    python3 -m venv /tmp/valet-py && /tmp/valet-py/bin/pip install ./clients/python
    export VALET_SERVER=http://127.0.0.1:7470
    export VALET_KEY=$(cat deploy/examples/demo-keys/agent.key)
    /tmp/valet-py/bin/python clients/python/examples/task_scope.py [COMMAND...]

The tool is a command run with the task's token in `VALET_TOKEN` (by default a Python one-liner
that says what it received). Whatever happens inside the block — the tool succeeds, fails, or the
agent raises — every grant of the task is revoked when it exits; the last lines prove it."""

import os
import subprocess
import sys

import valet


def run_tool(issued: valet.IssuedToken, command: list) -> int:
    """The agent's tool call: a subprocess that gets the token, and only the token."""
    environment = {"PATH": os.environ.get("PATH", ""), "VALET_TOKEN": issued.token.reveal()}
    return subprocess.run(command, env=environment, check=False).returncode


def main() -> int:
    command = sys.argv[1:] or [
        sys.executable,
        "-c",
        "import base64, json, os; claims = json.loads(base64.urlsafe_b64decode("
        "os.environ['VALET_TOKEN'].split('.')[1] + '==')); "
        "print(f\"tool: token for grant {claims['jti']}, audience {claims['aud']}, scope {claims['scope']}\")",
    ]
    with valet.Client.from_env() as client:
        print(f"valetd says we are {client.who_am_i()['principal']}")
        with client.task("fix-dns-42") as task:
            issued = task.request_token(
                "railway-staging-domains",
                params={"project": "shop"},
                purpose="add custom domain",
                ttl=300,
            )
            print(f"grant {issued.grant.id}: {issued.grant.scope} in {issued.grant.environment}, until {issued.grant.expires_at:%H:%M:%S}")
            claims = client.verifier().verify(issued.token, audience="railway")
            print(f"verified offline: issuer {claims['iss']}, expires {claims['exp']}")
            status = run_tool(issued, command)
            print(f"tool exited with {status}")
        print(f"task ended: revoked {task.revoked}")
        after = client.introspect(issued.token)
        print(f"the token now: active={after.active} ({after.reason})")
        return 0 if not after.active else 1


if __name__ == "__main__":
    sys.exit(main())
