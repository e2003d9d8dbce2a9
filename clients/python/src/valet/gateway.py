"""Calling upstreams through valetd's gateway with `requests` or `httpx`: an auth object that sends
the grant's token, and — for a call that needs a person's approval (HTTP 428) — waits for the
approval and retries the identical request once with `Valet-Approval`."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Union

from valet.secret import Secret
from valet.records import Approval

APPROVAL_HEADER = "Valet-Approval"
PRECONDITION_REQUIRED = 428

TokenSource = Union[Secret, str, Callable[[], Union[Secret, str]]]


def _token(source: TokenSource) -> str:
    value = source() if callable(source) else source
    return value.reveal() if isinstance(value, Secret) else value


def approval_id_of(status: int, body: bytes) -> Optional[str]:
    """The approval id of a 428 answer from the gateway; None for any other answer."""
    if status != PRECONDITION_REQUIRED:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or answer.get("error") != "approval_required":
        return None
    approval_id = answer.get("approval_id")
    return approval_id if isinstance(approval_id, str) and approval_id else None


class _Approvals:
    def __init__(self, client: Any, timeout: float, on_waiting: Optional[Callable[[Approval], None]]) -> None:
        self.client = client
        self.timeout = timeout
        self.on_waiting = on_waiting


class _TokenAndApprovals:
    """What both auth objects hold: where the token comes from, and how to wait for approvals."""

    def __init__(
        self,
        token: TokenSource,
        *,
        client: Any = None,
        approval_timeout: float = 300.0,
        on_waiting: Optional[Callable[[Approval], None]] = None,
    ) -> None:
        self._token = token
        self._approvals = _Approvals(client, approval_timeout, on_waiting) if client is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<token>)"


class ValetAuth(_TokenAndApprovals):
    """For `requests`: `session.auth = ValetAuth(issued.token, client=client)`. `token` may be a
    callable returning the current token (a renewing task: `lambda: task.current(id).token`).
    With `client`, a 428 is waited on (`client.wait_for_approval`) and the call retried once with
    its approval; without, the 428 is returned as it is. The retry resends the prepared body, so
    give it bytes, not a generator (a generator is spent by the first send, and the approval
    covers the exact body)."""

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {_token(self._token)}"
        if self._approvals is not None:
            request.register_hook("response", self._on_response)
        return request

    def _on_response(self, response, **keywords):
        approval_id = approval_id_of(response.status_code, response.content)
        if approval_id is None or APPROVAL_HEADER in response.request.headers:
            return response
        approvals = self._approvals
        approvals.client.wait_for_approval(approval_id, timeout=approvals.timeout, on_waiting=approvals.on_waiting)
        retry = response.request.copy()
        retry.headers[APPROVAL_HEADER] = approval_id
        retry.headers["Authorization"] = f"Bearer {_token(self._token)}"
        response.content  # noqa: B018 - read the 428 so its connection can be reused
        response.close()
        retried = response.connection.send(retry, **keywords)
        retried.history.append(response)
        return retried


try:
    import httpx
except ImportError:  # pragma: no cover - httpx is optional
    httpx = None


if httpx is not None:

    class ValetHttpxAuth(_TokenAndApprovals, httpx.Auth):
        """For `httpx` (sync `Client` with a `valet.Client`, or `AsyncClient` with a
        `valet.aio.AsyncClient`): the token on every request; a 428 waited on and retried once."""

        def _first(self, request):
            request.headers["Authorization"] = f"Bearer {_token(self._token)}"
            return request

        def _retry(self, request, approval_id: str):
            request.headers[APPROVAL_HEADER] = approval_id
            request.headers["Authorization"] = f"Bearer {_token(self._token)}"
            return request

        def sync_auth_flow(self, request):
            # Read a streamed body now: a retry after approval must send the very same bytes.
            request.read()
            response = yield self._first(request)
            response.read()
            approval_id = approval_id_of(response.status_code, response.content)
            if approval_id is not None and self._approvals is not None:
                approvals = self._approvals
                approvals.client.wait_for_approval(
                    approval_id, timeout=approvals.timeout, on_waiting=approvals.on_waiting
                )
                yield self._retry(request, approval_id)

        async def async_auth_flow(self, request):
            await request.aread()
            response = yield self._first(request)
            await response.aread()
            approval_id = approval_id_of(response.status_code, response.content)
            if approval_id is not None and self._approvals is not None:
                approvals = self._approvals
                await approvals.client.wait_for_approval(
                    approval_id, timeout=approvals.timeout, on_waiting=approvals.on_waiting
                )
                yield self._retry(request, approval_id)
