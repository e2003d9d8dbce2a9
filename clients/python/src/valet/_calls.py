"""What the sync and asyncio clients share: the wire stubs, and building requests and reading
answers, so both send the same requests and return the same records."""

from __future__ import annotations

import datetime
from typing import Any, Mapping, Optional, Tuple, Union

try:
    from valet.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
except ImportError as error:  # pragma: no cover - a broken install
    raise ImportError(
        "valet.v1 (the gRPC stubs) is missing: install the package with pip, whose build runs protoc on proto/valet/v1"
    ) from error

from valet.errors import ApprovalDenied, ApprovalTimeout
from valet.secret import Secret
from valet.records import Approval, IssuedToken

__all__ = ["admin_pb2", "admin_pb2_grpc", "broker_pb2", "broker_pb2_grpc"]

Ttl = Union[None, int, float, datetime.timedelta]


def ttl_seconds(ttl: Ttl) -> int:
    if ttl is None:
        return 0
    seconds = ttl.total_seconds() if isinstance(ttl, datetime.timedelta) else float(ttl)
    if seconds <= 0:
        raise ValueError(f"a TTL must be positive, and is {seconds} s (leave it out for the scope's default)")
    return max(1, int(round(seconds)))


def token_request(
    scope: str,
    task_id: str,
    params: Optional[Mapping[str, str]],
    purpose: str,
    ttl: Ttl,
    audience: str,
) -> Any:
    return broker_pb2.RequestTokenRequest(
        scope=scope,
        task_id=task_id,
        purpose=purpose,
        ttl_seconds=ttl_seconds(ttl),
        params=dict(params or {}),
        audience=audience,
    )


def token_text(token: Union[str, Secret]) -> str:
    return token.reveal() if isinstance(token, Secret) else token


def wait_timeout_seconds(timeout: float) -> int:
    if timeout <= 0 or timeout > 3600:
        raise ValueError(f"a wait lasts between 1 and 3600 s, and {timeout} was asked")
    return max(1, int(timeout))


class GrantWait:
    """Follows the messages of one WaitForGrant stream: tells the waiting callback once, and
    says how the wait ended."""

    def __init__(self, grant_id: str, on_waiting) -> None:
        self.grant_id = grant_id
        self.on_waiting = on_waiting
        self.told = False
        self.last: Optional[IssuedToken] = None

    def offer(self, message: Any) -> Optional[IssuedToken]:
        """The issued token once the grant is active; raises when it was denied."""
        issued = IssuedToken.from_wire(message)
        self.last = issued
        if issued.token:
            return issued
        if issued.grant.status in ("denied", "revoked", "expired"):
            reason = issued.grant.status_reason or (issued.approval.status_reason if issued.approval else "")
            raise ApprovalDenied(f"grant {self.grant_id} was {issued.grant.status}: {reason or 'no reason given'}")
        if not self.told and self.on_waiting is not None and issued.approval is not None:
            self.told = True
            self.on_waiting(issued.approval)
        return None

    def timed_out(self, timeout: float) -> ApprovalTimeout:
        approval = self.last.approval if self.last else None
        command = f" ({approval.approve_command})" if approval and approval.approve_command else ""
        return ApprovalTimeout(f"grant {self.grant_id} is still waiting for approval after {timeout:g} s{command}")


class ApprovalWait:
    """The same for one approval request followed by GetApproval and WatchApprovals."""

    def __init__(self, approval_id: str, on_waiting) -> None:
        self.approval_id = approval_id
        self.on_waiting = on_waiting
        self.told = False

    def offer(self, wire: Any) -> Optional[Approval]:
        approval = Approval.from_wire(wire)
        if approval.id != self.approval_id:
            return None
        if approval.status == "approved":
            return approval
        if approval.decided:
            raise ApprovalDenied(
                f"approval {approval.id} is {approval.status}: {approval.status_reason or 'no reason given'}"
            )
        if not self.told and self.on_waiting is not None:
            self.told = True
            self.on_waiting(approval)
        return None

    def timed_out(self, timeout: float) -> ApprovalTimeout:
        return ApprovalTimeout(f"approval {self.approval_id} is still pending after {timeout:g} s")


def jwks_of(answer: Any) -> Tuple[list, str]:
    keys = [
        {"kty": key.kty, "crv": key.crv, "x": key.x, "kid": key.kid, "alg": key.alg, "use": key.use}
        for key in answer.keys
    ]
    return keys, answer.issuer
