"""The shared client scenarios (clients/scenarios.md) against real valetd processes, with the
package as installed from its wheel."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import pathlib
import socket
import subprocess
import threading
import time

import grpc
import pytest

import valet
from valet.aio import AsyncClient
from valet.gateway import ValetAuth, ValetHttpxAuth
from valet.v1 import admin_pb2

from conftest import (
    ADMIN_KEY,
    AGENT_KEY,
    GITHUB_ROOT_SECRET,
    OPERATOR_KEY,
    RAILWAY_ROOT_SECRET,
    REPOSITORY,
    TOOLS_VENV,
    SPIFFE_ID,
    certificates,
    client_for,
    p256_key,
    standard_config,
    tools_python,
)


def staging(client, task, **keywords):
    return client.request_token("deploy-staging", task, params={"project": "shop"}, **keywords)


def approve(operator, approval_id, confirm="", reason="checked in the test"):
    """An operator's decision, through the generated stubs (the client is for agents)."""
    return operator._admin.Approve(
        admin_pb2.ApproveRequest(id=approval_id, confirm=confirm, reason=reason),
        metadata=operator.settings.metadata(),
        timeout=10,
    )


def test_token_lifecycle(valetd):
    with client_for(valetd, AGENT_KEY) as agent:
        issued = staging(agent, "py-lifecycle", purpose="lifecycle")
        assert not issued.pending and issued.token
        assert issued.grant.scope == "deploy-staging" and issued.grant.environment == "staging"
        assert issued.grant.params == {"project": "shop"}
        assert issued.token.reveal() not in repr(issued) and issued.token.reveal() not in str(issued.token)
        assert agent.introspect(issued.token).active
        claims = agent.verifier().verify(issued.token, audience="railway")
        assert claims["jti"] == issued.grant.id
        revoked = agent.revoke(issued.grant.id, "done")
        assert revoked.grant.status == "revoked"
        answer = agent.introspect(issued.token)
        assert not answer.active and "revoked" in answer.reason, answer


def test_renewal_within_the_maximum(valetd):
    with client_for(valetd, AGENT_KEY) as agent:
        issued = agent.request_token("short", "py-renew")
        renewed = agent.renew(issued.grant.id, ttl=6)
        assert renewed.token and renewed.token != issued.token
        assert issued.grant.expires_at < renewed.grant.expires_at <= renewed.grant.max_expires_at
        with pytest.raises(valet.ValetError) as refused:
            agent.renew(issued.grant.id, ttl=3600)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        # A task renews in the background once a third of the lifetime is left.
        with agent.task("py-renew-task", check_every=0.2) as task:
            held = task.request_token("short")
            time.sleep(2.6)
            current = task.current(held.grant.id)
            assert current.grant.expires_at > held.grant.expires_at, "renewed in the background"
            assert agent.introspect(current.token).active


def test_task_scope_revokes_on_exit_however_it_exits(valetd):
    with client_for(valetd, AGENT_KEY) as agent:
        with pytest.raises(RuntimeError):
            with agent.task("py-task-failed", renew=False) as task:
                first = task.request_token("deploy-staging", params={"project": "shop"})
                second = task.request_token("short")
                assert agent.introspect(first.token).active
                raise RuntimeError("the agent's tool call failed")
        assert sorted(task.revoked) == sorted([first.grant.id, second.grant.id])
        for issued in (first, second):
            answer = agent.introspect(issued.token)
            assert not answer.active
            assert "task failed: RuntimeError" in answer.grant.status_reason, answer

    async def scoped():
        async with AsyncClient(valet.Settings(server=valetd.server, credential=valet.PrincipalKey(AGENT_KEY))) as agent:
            async with agent.task("py-task-async") as task:
                issued = await task.request_token("deploy-staging", params={"project": "shop"})
                assert (await agent.introspect(issued.token)).active
            answer = await agent.introspect(issued.token)
            assert not answer.active and "task ended" in answer.grant.status_reason
            # Cancelled from outside (a timeout around the block): still revoked.
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.5):
                    async with agent.task("py-task-cancelled") as task:
                        cancelled = await task.request_token("short")
                        await asyncio.sleep(5)
            assert not (await agent.introspect(cancelled.token)).active

    asyncio.run(scoped())


class Listener:
    """A plaintext TCP listener on loopback that keeps every byte it is sent."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.received = bytearray()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            connection.settimeout(0.5)
            try:
                while True:
                    data = connection.recv(65536)
                    if not data:
                        break
                    self.received.extend(data)
            except OSError:
                pass
            finally:
                connection.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.socket.close()


def test_a_server_address_is_read_as_the_cli_reads_it_and_https_never_means_plaintext():
    listener = Listener()
    try:
        # An address without a scheme is refused before anything is sent.
        for server in (f"127.0.0.1:{listener.port}", f"localhost:{listener.port}"):
            with pytest.raises(valet.ConfigurationError, match="no scheme"):
                valet.Client(valet.Settings(server=server, credential=valet.PrincipalKey(AGENT_KEY)))
        assert listener.received == b""
        # HTTPS in any case is TLS: the plaintext listener sees a TLS handshake, never the key.
        for server in (f"HTTPS://127.0.0.1:{listener.port}", f"Https://127.0.0.1:{listener.port}"):
            client = valet.Client(
                valet.Settings(server=server, credential=valet.PrincipalKey(AGENT_KEY)), timeout=2
            )
            with pytest.raises(valet.ValetError):
                client.request_token("deploy-staging", "py-url", params={"project": "shop"})
            client.close()
        time.sleep(0.6)
        assert listener.received, "the client connected"
        assert listener.received[0] == 0x16, "a TLS record (handshake), not HTTP/2 in the clear"
        assert AGENT_KEY.encode() not in listener.received
        assert b"authorization" not in listener.received.lower()
    finally:
        listener.close()


TASK_UNDER_SIGNAL = """
import asyncio, sys, time
import valet
from valet.aio import AsyncClient

server, key, mode = sys.argv[1:4]
settings = valet.Settings(server=server, credential=valet.PrincipalKey(key))
if mode == "sync":
    with valet.Client(settings) as client:
        with client.task("py-signalled-" + sys.argv[4], renew=False) as task:
            issued = task.request_token("deploy-staging", params={"project": "shop"})
            print(issued.token.reveal(), flush=True)
            time.sleep(60)
else:
    async def main():
        async with AsyncClient(settings) as client:
            async with client.task("py-signalled-" + sys.argv[4], renew=False) as task:
                issued = await task.request_token("deploy-staging", params={"project": "shop"})
                print(issued.token.reveal(), flush=True)
                await asyncio.sleep(60)
    asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_task_scope_ended_by_sigterm_or_sighup_revokes_its_grants(valetd, mode, signame):
    import signal as signals
    import sys

    signum = getattr(signals, signame)
    process = subprocess.Popen(
        [sys.executable, "-c", TASK_UNDER_SIGNAL, valetd.server, AGENT_KEY, mode, f"{mode}-{signame}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        token = process.stdout.readline().strip()
        assert token.count(".") == 2, process.stderr.read()
        process.send_signal(signum)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    # The process still ends by the signal, once its grants are revoked.
    assert process.returncode == -signum, process.stderr.read()
    with client_for(valetd, AGENT_KEY) as agent:
        answer = agent.introspect(token)
        assert not answer.active
        assert f"task interrupted by signal {signame}" in answer.grant.status_reason, answer


def test_approval_wait(valetd):
    with client_for(valetd, AGENT_KEY) as agent, client_for(valetd, OPERATOR_KEY) as operator:
        issued = agent.request_token("prod-approval", "py-approval", purpose="migrate")
        assert issued.pending and issued.token is None
        assert "prod-approval" in issued.approval.rendered and issued.approval.confirm == "environment"
        told = []

        def on_waiting(approval):
            told.append(approval)
            threading.Timer(0.3, approve, (operator, approval.id, "production")).start()

        with pytest.raises(valet.ApprovalTimeout):
            agent.wait_for_grant(issued.grant.id, timeout=1)
        granted = agent.wait_for_grant(issued.grant.id, timeout=30, on_waiting=on_waiting)
        assert len(told) == 1 and told[0].id == issued.approval.id
        assert granted.token and agent.introspect(granted.token).active
        assert granted.grant.status == "active"

        # The asyncio client waits the same way.
        async def waited_async():
            settings = valet.Settings(server=valetd.server, credential=valet.PrincipalKey(AGENT_KEY))
            async with AsyncClient(settings) as async_agent:
                pending = await async_agent.request_token("prod-approval", "py-approval-async")
                threading.Timer(0.3, approve, (operator, pending.approval.id, "production")).start()
                return await async_agent.wait_for_grant(pending.grant.id, timeout=30)

        assert agent.introspect(asyncio.run(waited_async()).token).active

        # Denied: the wait says so.
        denied = agent.request_token("prod-approval", "py-denied")
        operator._admin.Deny(
            admin_pb2.DenyRequest(id=denied.approval.id, reason="not during the freeze"),
            metadata=operator.settings.metadata(),
            timeout=10,
        )
        with pytest.raises(valet.ApprovalDenied) as refused:
            agent.wait_for_grant(denied.grant.id, timeout=30)
        assert "not during the freeze" in str(refused.value)


class Upstream:
    """A plain HTTP upstream on loopback that records every request it executes."""

    def __init__(self) -> None:
        self.seen = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
                payload = json.dumps({"ok": True, "method": self.command, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_DELETE = do_POST = _answer

            def log_message(self, *_arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def test_gateway_call_waits_for_its_approval_and_goes_through_once(deploy):
    requests = pytest.importorskip("requests", reason="installed with the package's [requests] extra")
    httpx = pytest.importorskip("httpx", reason="installed with the package's [httpx] extra")
    upstream = Upstream()
    config = standard_config(
        f"""
[[upstream]]
name = "railway"
base_url = "{upstream.url}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "volumes"
upstream = "railway"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
methods = ["GET"]
path = "/v1/volumes/*"
[[scope.allow]]
methods = ["DELETE"]
path = "/v1/volumes/*"
query = {{ force = {{ one_of = ["true", "false"] }} }}
approval = true
""",
        server_extra='gateway_listen = "127.0.0.1:0"',
        agent_scopes=["volumes"],
    )
    valetd = deploy(config).start()
    try:
        with client_for(valetd, AGENT_KEY) as agent, client_for(valetd, OPERATOR_KEY) as operator:
            issued = agent.request_token("volumes", "py-gateway")
            base = f"http://{valetd.gateway}/u/railway"
            shown = []

            def on_waiting(approval):
                shown.append(approval)
                threading.Timer(0.3, approve, (operator, approval.id)).start()

            with requests.Session() as session:
                session.auth = ValetAuth(issued.token, client=agent, on_waiting=on_waiting)
                assert session.get(f"{base}/v1/volumes/vol-1").status_code == 200
                answer = session.delete(f"{base}/v1/volumes/vol-scratch?force=true")
                assert answer.status_code == 200, answer.text
                assert answer.history and answer.history[0].status_code == 428
            assert len(shown) == 1 and "DELETE /v1/volumes/vol-scratch?force=true" in shown[0].rendered

            with httpx.Client() as http_client:
                auth = ValetHttpxAuth(issued.token, client=agent, on_waiting=on_waiting)
                answer = http_client.delete(f"{base}/v1/volumes/vol-other", auth=auth)
                assert answer.status_code == 200, answer.text
                # A streamed body is read before the first send, so the retry sends the same bytes.
                answer = http_client.request(
                    "DELETE",
                    f"{base}/v1/volumes/vol-streamed",
                    content=iter([b'{"reason": ', b'"scratch"}']),
                    headers={"Content-Type": "application/json"},
                    auth=auth,
                )
                assert answer.status_code == 200, answer.text
            # asyncio: the async client waits, httpx.AsyncClient retries.
            async def through_async():
                settings = valet.Settings(server=valetd.server, credential=valet.PrincipalKey(AGENT_KEY))
                async with AsyncClient(settings) as async_agent:
                    auth = ValetHttpxAuth(issued.token, client=async_agent, on_waiting=on_waiting)
                    async with httpx.AsyncClient() as http_client:
                        return await http_client.delete(f"{base}/v1/volumes/vol-async", auth=auth)

            answer = asyncio.run(through_async())
            assert answer.status_code == 200, answer.text
            assert len(shown) == 4
            # Without a client to wait with, the 428 comes back as it is.
            with httpx.Client() as http_client:
                answer = http_client.delete(f"{base}/v1/volumes/vol-third", auth=ValetHttpxAuth(issued.token))
                assert answer.status_code == 428 and answer.json()["approval_id"].startswith("ap_")

        deletes = [seen for seen in upstream.seen if seen[0] == "DELETE"]
        assert [path for _, path, _, _ in deletes] == [
            "/v1/volumes/vol-scratch?force=true",
            "/v1/volumes/vol-other",
            "/v1/volumes/vol-streamed",
            "/v1/volumes/vol-async",
        ], "each approved call executed once; the unapproved one never"
        assert all(authorization == f"Bearer {RAILWAY_ROOT_SECRET}" for _, _, authorization, _ in upstream.seen)
    finally:
        upstream.close()


def test_identity_token_login(deploy, tmp_path, monkeypatch):
    import jwt
    from jwt.algorithms import ECAlgorithm

    key = p256_key()
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "py-1", "use": "sig", "alg": "ES256"})
    issuer = "https://ci.example.com"
    config = standard_config(
        f"""
[[principal]]
name = "file-agent"
roles = ["agent"]
scopes = ["deploy-staging"]
[[principal.identity]]
issuer = "ci"
subject = "job:build"

[[issuer]]
name = "ci"
issuer = "{issuer}"
audiences = ["valet"]
jwks_file = "ci-jwks.json"
algorithms = ["ES256"]
"""
    )
    deployment = deploy(config)
    deployment.path("ci-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    valetd = deployment.start()
    now = int(time.time())
    token = jwt.encode(
        {"iss": issuer, "aud": "valet", "sub": "job:build", "iat": now, "nbf": now, "exp": now + 600},
        key,
        algorithm="ES256",
        headers={"kid": "py-1"},
    )
    token_file = tmp_path / "identity.jwt"
    token_file.write_text(token + "\n")
    monkeypatch.setenv("VALET_SERVER", valetd.server)
    monkeypatch.setenv("VALET_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.delenv("VALET_KEY", raising=False)
    with valet.Client.from_env() as agent:
        me = agent.who_am_i()
        assert me["principal"] == "file-agent" and me["auth_method"] == "identity_token", me
        issued = staging(agent, "py-identity")
        assert issued.grant.principal == "file-agent"
    # In a GitHub Actions job: the runner's OIDC endpoint gives the token (asked for audience valet).
    asked = []

    class Runner(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Authorization")))
            payload = json.dumps({"value": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_arguments):
            pass

    runner = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Runner)
    threading.Thread(target=runner.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("VALET_IDENTITY_TOKEN_FILE")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"http://127.0.0.1:{runner.server_address[1]}/token?api-version=2.0")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runner-request-token")
        with valet.Client.from_env() as agent:
            assert agent.who_am_i()["principal"] == "file-agent"
            assert "runner-request-token" not in repr(agent)
        assert asked == [("/token?api-version=2.0&audience=valet", "Bearer runner-request-token")]
    finally:
        runner.shutdown()

    # A token for someone else is refused, with the reason.
    stranger = jwt.encode(
        {"iss": issuer, "aud": "valet", "sub": "job:other", "iat": now, "exp": now + 600},
        key,
        algorithm="ES256",
        headers={"kid": "py-1"},
    )
    token_file.write_text(stranger)
    with pytest.raises(valet.ValetError) as refused:
        with valet.Client(valet.Settings(server=valetd.server, credential=valet.IdentityTokenFile(str(token_file)))) as other:
            other.who_am_i()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED, refused.value
    assert token not in str(refused.value) and stranger not in str(refused.value)




def test_tls(deploy, tmp_path):
    deployment = deploy(
        standard_config(
            f"""
[[principal]]
name = "builder"
roles = ["agent"]
scopes = ["limited"]
[[principal.certificate]]
spiffe_id = "{SPIFFE_ID}"
""",
            server_extra='tls_cert_file = "server.crt"\ntls_key_file = "server.key"\n'
            'client_ca_file = "client-ca.crt"\nclient_auth = "optional"',
        )
    )
    certificates(deployment.directory)
    valetd = deployment.start(scheme="https")
    ca_file = str(deployment.path("ca.crt"))
    with client_for(valetd, AGENT_KEY, ca_file=ca_file) as agent:
        issued = staging(agent, "py-tls")
        assert agent.introspect(issued.token).active
    # Mutual TLS: the client certificate alone says who the caller is.
    mutual = valet.Settings(
        server=valetd.server,
        ca_file=ca_file,
        client_cert=str(deployment.path("builder.crt")),
        client_key=str(deployment.path("builder.key")),
    )
    with valet.Client(mutual) as builder:
        me = builder.who_am_i()
        assert me["principal"] == "builder" and me["auth_method"] == "client_certificate", me
        assert me["auth_subject"] == SPIFFE_ID, me
        assert builder.request_token("limited", "py-mtls").grant.principal == "builder"
    # Without the CA, valetd's certificate is not trusted: refused before any credential is sent.
    with pytest.raises(valet.ValetError) as refused:
        with client_for(valetd, AGENT_KEY, ca_file=None) as untrusting:
            untrusting.who_am_i()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    # Plaintext to a TLS listener is refused too.
    plaintext = valet.Settings(server=valetd.server.replace("https://", "http://"), credential=valet.PrincipalKey(AGENT_KEY))
    with pytest.raises(valet.ValetError):
        with valet.Client(plaintext, timeout=5) as agent:
            agent.who_am_i()


def test_offline_verification_after_rotation(valetd):
    with client_for(valetd, AGENT_KEY) as agent, client_for(valetd, ADMIN_KEY) as admin:
        verifier = agent.verifier()
        old = staging(agent, "py-rotation-old")
        assert verifier.verify(old.token, "railway")["jti"] == old.grant.id
        rotated = admin._admin.RotateSigningKey(
            admin_pb2.RotateSigningKeyRequest(), metadata=admin.settings.metadata(), timeout=10
        )
        new = staging(agent, "py-rotation-new")
        header = json.loads(base64.urlsafe_b64decode(new.token.reveal().split(".")[0] + "=="))
        assert header["kid"] == rotated.new_key_id and header["alg"] == "EdDSA"
        assert verifier.verify(new.token, "railway")["jti"] == new.grant.id, "the new key was fetched"
        assert verifier.verify(old.token, "railway")["jti"] == old.grant.id, "the old key still verifies"
        with pytest.raises(valet.VerificationError, match="audience"):
            verifier.verify(new.token, "github")
        head, body, signature = new.token.reveal().split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["environment"] = "production"
        forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        with pytest.raises(valet.VerificationError):
            verifier.verify(f"{head}.{forged_body}.{signature}", "railway")
        unsigned = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": header["kid"]}).encode()).rstrip(b"=").decode()
        with pytest.raises(valet.VerificationError, match="algorithm"):
            verifier.verify(f"{unsigned}.{body}.", "railway")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_aws_credentials(deploy):
    pytest.importorskip("boto3", reason="installed with the package's [aws] extra")
    moto_server = TOOLS_VENV / "bin" / "moto_server"
    if not moto_server.exists():
        raise AssertionError(f"{moto_server} is missing: run ./scripts/test.sh, which installs moto")
    port = _free_port()
    moto = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        env={"PATH": "/usr/bin:/bin", "INITIAL_NO_AUTH_ACTION_COUNT": "7"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not listen within 30 s"
                time.sleep(0.05)
        setup = json.loads(
            subprocess.run(
                [str(tools_python()), str(REPOSITORY / "tests" / "aws" / "moto_setup.py"), endpoint],
                check=True,
                capture_output=True,
            ).stdout
        )
        config = standard_config(
            f"""
[[credential]]
name = "aws-root"
kind = "aws"
access_key_id = "{setup['access_key_id']}"
file = "aws.secret"
region = "us-east-1"
endpoint = "{endpoint}"

[[scope]]
name = "reports-read"
credential = "aws-root"
provider = "aws-sts"
environment = "staging"
default_ttl = "5m"
max_ttl = "1h"
role_arn = "{setup['role_arn']}"
actions = ["s3:ListBucket", "s3:GetObject"]
resources = ["arn:aws:s3:::reports-{{team}}", "arn:aws:s3:::reports-{{team}}/*"]
[scope.params.team]
pattern = "[a-z]{{1,16}}"
""",
            agent_scopes=["reports-read"],
        )
        deployment = deploy(config)
        deployment.path("aws.secret").write_text(setup["secret_access_key"] + "\n")
        valetd = deployment.start()
        team = setup["bucket"].removeprefix("reports-")
        with client_for(valetd, AGENT_KEY) as agent:
            issued = agent.request_token("reports-read", "py-aws", params={"team": team})
        aws = issued.aws
        assert aws is not None and aws.access_key_id and aws.region == "us-east-1"
        assert aws.secret_access_key.reveal() not in repr(issued) and aws.session_token.reveal() not in repr(aws)
        environment = aws.environment()
        assert set(environment) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"}
        assert environment["AWS_SESSION_TOKEN"] == aws.session_token.reveal()
        s3 = aws.boto3_session().client("s3", endpoint_url=endpoint)
        listed = s3.list_objects_v2(Bucket=setup["bucket"])
        assert listed["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert GITHUB_ROOT_SECRET not in repr(issued)
    finally:
        moto.terminate()
        moto.wait(10)


def test_refusal_says_why(valetd, deploy):
    with client_for(valetd, AGENT_KEY) as agent:
        with pytest.raises(valet.ValetError) as refused:
            agent.request_token("no-such-scope", "py-refused")
    error = refused.value
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert "no-such-scope" in error.reason, error
    assert error.request_id, "valetd's request id comes back with the refusal"
    records = [json.loads(line) for line in pathlib.Path(valetd.process.args[2]).parent.joinpath("audit/audit.jsonl").read_text().splitlines()]
    assert any(record.get("request_id") == error.request_id and record["outcome"] == "denied" for record in records)
    with pytest.raises(valet.ValetError) as unknown:
        with client_for(valetd, "vk_not_a_key_anyone_has") as stranger:
            stranger.who_am_i()
    assert unknown.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "vk_not_a_key_anyone_has" not in str(unknown.value)


def test_every_shared_scenario_has_a_test_here(request):
    table = (REPOSITORY / "clients" / "scenarios.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| scenario") and "---" not in line]
    names = {item.name.split("[")[0] for item in request.session.items}
    missing = [row.split("|")[3].strip() for row in rows if row.split("|")[3].strip() not in names]
    assert rows and not missing, f"scenarios with no Python test: {missing}"
