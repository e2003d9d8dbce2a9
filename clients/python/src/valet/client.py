"""The synchronous client: one gRPC channel to valetd, the broker's operations, approvals the
caller may see, offline verification, and task scopes that revoke everything they were given when
they end."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Mapping, Optional, Union

import grpc

from valet import _calls
from valet._calls import Ttl, admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from valet._task_state import TaskState, TerminationSignals, end_reason, resend
from valet.errors import ValetError, from_rpc_error
from valet.secret import Secret
from valet.settings import Settings
from valet.records import Approval, Grant, Introspection, IssuedToken, Revoked
from valet.verify import OfflineVerifier

log = logging.getLogger("valet")

OnWaiting = Optional[Callable[[Approval], None]]


class Client:
    """A client for valetd. `Client.from_env()` reads the same variables as the `valet` CLI."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        settings.check()
        self.settings = settings
        self.timeout = timeout
        if settings.secure:
            self._channel = grpc.secure_channel(
                settings.target, settings.channel_credentials(), options=settings.channel_options()
            )
        else:
            self._channel = grpc.insecure_channel(settings.target, options=settings.channel_options())
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    @classmethod
    def from_env(cls, **keywords) -> "Client":
        return cls(Settings.from_env(), **keywords)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exception) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(server={self.settings.server!r}, credential={self.settings.credential!r})"

    def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.settings.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # The broker.

    def request_token(
        self,
        scope: str,
        task_id: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        purpose: str = "",
        ttl: Ttl = None,
        audience: str = "",
    ) -> IssuedToken:
        """A token for one scope and one task. For a scope that needs approval the answer is
        pending (`issued.pending`): wait with `wait_for_grant`."""
        request = _calls.token_request(scope, task_id, params, purpose, ttl, audience)
        return IssuedToken.from_wire(self._call(self._broker.RequestToken, request))

    def wait_for_grant(self, grant_id: str, *, timeout: float = 300.0, on_waiting: OnWaiting = None) -> IssuedToken:
        """Waits until people decide on a pending grant: the token once approved;
        `ApprovalDenied` when denied or expired, `ApprovalTimeout` when `timeout` passes first.
        `on_waiting(approval)` is called once, while waiting (to tell a person what is asked)."""
        wait = _calls.GrantWait(grant_id, on_waiting)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise wait.timed_out(timeout)
            request = broker_pb2.WaitForGrantRequest(
                grant_id=grant_id, timeout_seconds=_calls.wait_timeout_seconds(min(left, 3600))
            )
            try:
                for message in self._broker.WaitForGrant(request, timeout=left + 5, metadata=self.settings.metadata()):
                    issued = wait.offer(message)
                    if issued is not None:
                        return issued
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise wait.timed_out(timeout) from None
                raise from_rpc_error(error) from None

    def renew(self, grant_id: str, ttl: Ttl = None) -> IssuedToken:
        """Extends a grant's expiry (never past its scope's maximum) with a fresh token."""
        answer = self._call(
            self._broker.RenewToken,
            broker_pb2.RenewTokenRequest(grant_id=grant_id, ttl_seconds=_calls.ttl_seconds(ttl)),
        )
        return IssuedToken.from_wire(answer)

    def revoke(self, grant_id: str, reason: str = "") -> Revoked:
        """Revokes one grant; in force before this returns."""
        answer = self._call(self._broker.RevokeToken, broker_pb2.RevokeTokenRequest(grant_id=grant_id, reason=reason))
        return Revoked(grant=Grant.from_wire(answer.grant), notice=answer.notice or None)

    def revoke_task(self, task_id: str, reason: str = "") -> List[str]:
        """Revokes every grant of the task the caller holds; returns their ids."""
        answer = self._call(self._broker.RevokeTask, broker_pb2.RevokeTaskRequest(task_id=task_id, reason=reason))
        return list(answer.grant_ids)

    def introspect(self, token: Union[str, Secret]) -> Introspection:
        """Whether the token is active now (counts one use when its scope limits uses)."""
        request = broker_pb2.IntrospectRequest(token=_calls.token_text(token))
        return Introspection.from_wire(self._call(self._broker.Introspect, request))

    def jwks(self):
        """valetd's public keys (as JWK dicts) and the issuer its tokens carry."""
        return _calls.jwks_of(self._call(self._broker.GetJwks, broker_pb2.GetJwksRequest()))

    def verifier(self, **keywords) -> OfflineVerifier:
        """An offline verifier on this client's JWKS (fetched on first use and after rotations)."""
        return OfflineVerifier(self.jwks, **keywords)

    def who_am_i(self) -> dict:
        answer = self._call(self._broker.WhoAmI, broker_pb2.WhoAmIRequest())
        return {
            "principal": answer.principal,
            "roles": list(answer.roles),
            "scopes": list(answer.scopes),
            "auth_method": answer.auth_method,
            "auth_subject": answer.auth_subject,
            "auth_issuer": answer.auth_issuer,
        }

    # Approvals the caller may see (its own requests; every request for operators).

    def get_approval(self, approval_id: str) -> Approval:
        return Approval.from_wire(self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id)))

    def wait_for_approval(self, approval_id: str, *, timeout: float = 300.0, on_waiting: OnWaiting = None) -> Approval:
        """Waits until people decide on an approval request (a gateway call answered 428): the
        approval once approved; `ApprovalDenied` or `ApprovalTimeout` otherwise."""
        wait = _calls.ApprovalWait(approval_id, on_waiting)
        deadline = time.monotonic() + timeout
        stream = self._admin.WatchApprovals(
            admin_pb2.WatchApprovalsRequest(), timeout=timeout, metadata=self.settings.metadata()
        )
        try:
            # Watching first, then reading, so a decision between the two is not missed.
            decided = wait.offer(self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id)))
            if decided is not None:
                return decided
            for message in stream:
                decided = wait.offer(message)
                if decided is not None:
                    return decided
            # The watch ended (valetd restarting): read once more.
            if time.monotonic() < deadline:
                decided = wait.offer(self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id)))
                if decided is not None:
                    return decided
            raise wait.timed_out(timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise wait.timed_out(timeout) from None
            raise from_rpc_error(error) from None
        finally:
            stream.cancel()

    # Task scopes.

    def task(self, task_id: str, *, renew: bool = True, check_every: float = 1.0) -> "Task":
        """A scope for one task: `with client.task("fix-dns-42") as task:`. Every grant of the
        task is revoked when the block exits, however it exits — an exception, Ctrl-C (SIGINT),
        and, in the main thread, SIGTERM and SIGHUP (the signal is sent again once the grants are
        revoked, so the process still ends by it); with `renew`, grants are renewed in the
        background once a third of their lifetime is left."""
        return Task(self, task_id, renew=renew, check_every=check_every)


class Task:
    """The grants of one task, revoked together when the task ends."""

    def __init__(self, client: Client, task_id: str, *, renew: bool, check_every: float) -> None:
        self.client = client
        self.state = TaskState(task_id)
        self._renew = renew
        self._check_every = check_every
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._signals = TerminationSignals()
        self.revoked: List[str] = []

    @property
    def task_id(self) -> str:
        return self.state.task_id

    def request_token(self, scope: str, **keywords) -> IssuedToken:
        """A token for `scope` within this task (keywords as `Client.request_token`)."""
        issued = self.client.request_token(scope, self.task_id, **keywords)
        self.state.hold(issued, keywords.get("ttl"))
        return issued

    def wait_for_grant(self, grant_id: str, **keywords) -> IssuedToken:
        issued = self.client.wait_for_grant(grant_id, **keywords)
        self.state.hold(issued, None)
        return issued

    def current(self, grant_id: str) -> Optional[IssuedToken]:
        """The latest token of a grant of this task (after background renewals)."""
        return self.state.current(grant_id)

    def renew_due(self) -> None:
        for grant_id, ttl in self.state.due():
            try:
                self.state.renewed(self.client.renew(grant_id, ttl))
            except ValetError as error:
                log.warning("task %s: grant %s not renewed, and no longer renewed: %s", self.task_id, grant_id, error)
                self.state.stop_renewing(grant_id)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self._check_every):
            self.renew_due()

    def __enter__(self) -> "Task":
        self._signals.install()
        if self._renew:
            self._thread = threading.Thread(target=self._renew_forever, name=f"valet-task-{self.task_id}", daemon=True)
            self._thread.start()
        return self

    def end(self, error: Optional[BaseException] = None) -> List[str]:
        """Ends the task now: stops renewing and revokes every grant it holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.revoked = self.client.revoke_task(self.task_id, end_reason(error))
        return self.revoked

    def __exit__(self, _type, error, _traceback) -> None:
        try:
            self.end(error)
        except ValetError as revoke_error:
            if error is None:
                raise
            # The task's own failure is what propagates; the failed revocation is said loudly.
            log.error("task %s failed and its grants could not be revoked: %s", self.task_id, revoke_error)
        finally:
            self._signals.restore()
            resend(error)
