"""The asyncio client: the same operations as `valet.Client` on `grpc.aio`, and `async with
client.task(...)` scopes whose grants are revoked when the block exits, however it exits."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import List, Mapping, Optional, Union

import grpc
import grpc.aio

from valet import _calls
from valet._calls import Ttl, admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from valet._task_state import TERMINATING, TaskInterrupted, TaskState, end_reason, resend
from valet.client import OnWaiting
from valet.errors import ValetError, from_rpc_error
from valet.secret import Secret
from valet.settings import Settings
from valet.records import Approval, Grant, Introspection, IssuedToken, Revoked
from valet.verify import OfflineVerifier

log = logging.getLogger("valet")


class AsyncClient:
    """An asyncio client for valetd; create it inside a running event loop."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        settings.check()
        self.settings = settings
        self.timeout = timeout
        if settings.secure:
            self._channel = grpc.aio.secure_channel(
                settings.target, settings.channel_credentials(), options=settings.channel_options()
            )
        else:
            self._channel = grpc.aio.insecure_channel(settings.target, options=settings.channel_options())
        self._broker = broker_pb2_grpc.BrokerStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    @classmethod
    def from_env(cls, **keywords) -> "AsyncClient":
        return cls(Settings.from_env(), **keywords)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_exception) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(server={self.settings.server!r}, credential={self.settings.credential!r})"

    async def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.settings.metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def request_token(
        self,
        scope: str,
        task_id: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        purpose: str = "",
        ttl: Ttl = None,
        audience: str = "",
    ) -> IssuedToken:
        request = _calls.token_request(scope, task_id, params, purpose, ttl, audience)
        return IssuedToken.from_wire(await self._call(self._broker.RequestToken, request))

    async def wait_for_grant(
        self, grant_id: str, *, timeout: float = 300.0, on_waiting: OnWaiting = None
    ) -> IssuedToken:
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
                async for message in self._broker.WaitForGrant(
                    request, timeout=left + 5, metadata=self.settings.metadata()
                ):
                    issued = wait.offer(message)
                    if issued is not None:
                        return issued
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise wait.timed_out(timeout) from None
                raise from_rpc_error(error) from None

    async def renew(self, grant_id: str, ttl: Ttl = None) -> IssuedToken:
        answer = await self._call(
            self._broker.RenewToken,
            broker_pb2.RenewTokenRequest(grant_id=grant_id, ttl_seconds=_calls.ttl_seconds(ttl)),
        )
        return IssuedToken.from_wire(answer)

    async def revoke(self, grant_id: str, reason: str = "") -> Revoked:
        answer = await self._call(
            self._broker.RevokeToken, broker_pb2.RevokeTokenRequest(grant_id=grant_id, reason=reason)
        )
        return Revoked(grant=Grant.from_wire(answer.grant), notice=answer.notice or None)

    async def revoke_task(self, task_id: str, reason: str = "") -> List[str]:
        answer = await self._call(self._broker.RevokeTask, broker_pb2.RevokeTaskRequest(task_id=task_id, reason=reason))
        return list(answer.grant_ids)

    async def introspect(self, token: Union[str, Secret]) -> Introspection:
        request = broker_pb2.IntrospectRequest(token=_calls.token_text(token))
        return Introspection.from_wire(await self._call(self._broker.Introspect, request))

    async def jwks(self):
        return _calls.jwks_of(await self._call(self._broker.GetJwks, broker_pb2.GetJwksRequest()))

    async def verifier(self, **keywords) -> OfflineVerifier:
        """An offline verifier, its keys fetched now; a rotation later is picked up by a
        synchronous refetch on this client's settings (verification itself never waits on I/O
        unless a token names an unknown key)."""
        keys, issuer = await self.jwks()
        verifier = OfflineVerifier(lambda: _fetch_jwks_blocking(self.settings), **keywords)
        verifier.load(keys, issuer)
        return verifier

    async def get_approval(self, approval_id: str) -> Approval:
        return Approval.from_wire(
            await self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id))
        )

    async def wait_for_approval(
        self, approval_id: str, *, timeout: float = 300.0, on_waiting: OnWaiting = None
    ) -> Approval:
        wait = _calls.ApprovalWait(approval_id, on_waiting)
        stream = self._admin.WatchApprovals(
            admin_pb2.WatchApprovalsRequest(), timeout=timeout, metadata=self.settings.metadata()
        )
        try:
            decided = wait.offer(
                await self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id))
            )
            if decided is not None:
                return decided
            async for message in stream:
                decided = wait.offer(message)
                if decided is not None:
                    return decided
            decided = wait.offer(
                await self._call(self._admin.GetApproval, admin_pb2.GetApprovalRequest(id=approval_id))
            )
            if decided is not None:
                return decided
            raise wait.timed_out(timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise wait.timed_out(timeout) from None
            raise from_rpc_error(error) from None
        finally:
            stream.cancel()

    def task(self, task_id: str, *, renew: bool = True, check_every: float = 1.0) -> "AsyncTask":
        """`async with client.task("fix-dns-42") as task:` — as `Client.task`."""
        return AsyncTask(self, task_id, renew=renew, check_every=check_every)


def _fetch_jwks_blocking(settings: Settings):
    from valet.client import Client

    with Client(settings) as client:
        return client.jwks()


class AsyncTask:
    """The grants of one task, revoked together when the `async with` block exits."""

    def __init__(self, client: AsyncClient, task_id: str, *, renew: bool, check_every: float) -> None:
        self.client = client
        self.state = TaskState(task_id)
        self._renew = renew
        self._check_every = check_every
        self._renewer: Optional[asyncio.Task] = None
        self._signals: List[int] = []
        self._interrupted: Optional[int] = None
        self.revoked: List[str] = []

    @property
    def task_id(self) -> str:
        return self.state.task_id

    async def request_token(self, scope: str, **keywords) -> IssuedToken:
        issued = await self.client.request_token(scope, self.task_id, **keywords)
        self.state.hold(issued, keywords.get("ttl"))
        return issued

    async def wait_for_grant(self, grant_id: str, **keywords) -> IssuedToken:
        issued = await self.client.wait_for_grant(grant_id, **keywords)
        self.state.hold(issued, None)
        return issued

    def current(self, grant_id: str) -> Optional[IssuedToken]:
        return self.state.current(grant_id)

    async def renew_due(self) -> None:
        for grant_id, ttl in self.state.due():
            try:
                self.state.renewed(await self.client.renew(grant_id, ttl))
            except ValetError as error:
                log.warning("task %s: grant %s not renewed, and no longer renewed: %s", self.task_id, grant_id, error)
                self.state.stop_renewing(grant_id)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._check_every)
            await self.renew_due()

    def _watch_signals(self) -> None:
        """SIGTERM and SIGHUP cancel the block (where the application left their default action
        and the loop can watch signals: the main thread on Unix); the scope then revokes its grants
        and sends the signal again."""
        import signal

        loop = asyncio.get_running_loop()
        block = asyncio.current_task()
        if block is None:
            return

        def interrupted(signum: int) -> None:
            self._interrupted = signum
            block.cancel()

        for signum in TERMINATING:
            if signal.getsignal(signum) is not signal.SIG_DFL:
                continue
            try:
                loop.add_signal_handler(signum, interrupted, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self._signals.append(signum)

    def _unwatch_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()

    async def __aenter__(self) -> "AsyncTask":
        self._watch_signals()
        if self._renew:
            self._renewer = asyncio.create_task(self._renew_forever(), name=f"valet-task-{self.task_id}")
        return self

    async def end(self, error: Optional[BaseException] = None) -> List[str]:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except asyncio.CancelledError:
                pass
            self._renewer = None
        self.revoked = await self.client.revoke_task(self.task_id, end_reason(error))
        return self.revoked

    async def __aexit__(self, _type, error, _traceback) -> None:
        if self._interrupted is not None:
            error = TaskInterrupted(self._interrupted)
        try:
            # Shielded: a cancelled block (a timeout around it) still revokes its grants.
            await asyncio.shield(self.end(error))
        except ValetError as revoke_error:
            if error is None:
                raise
            log.error("task %s failed and its grants could not be revoked: %s", self.task_id, revoke_error)
        finally:
            self._unwatch_signals()
            resend(error)
