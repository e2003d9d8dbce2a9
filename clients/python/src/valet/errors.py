"""What goes wrong, as exceptions that say what valetd said: the gRPC code, valetd's reason, and the
request id valetd logged and audited the call under (quote it to an operator)."""

from __future__ import annotations

from typing import Optional

import grpc


class ValetError(Exception):
    """A call to valetd failed. `code` is the gRPC status code (None when no call was made),
    `reason` valetd's explanation (what was wrong and what is allowed), `request_id` the id of
    valetd's log lines and audit record for the call."""

    def __init__(
        self,
        reason: str,
        code: Optional[grpc.StatusCode] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.reason]
        if self.code is not None:
            parts.insert(0, f"{self.code.name}:")
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r}, request_id={self.request_id!r})"


class ConfigurationError(ValetError):
    """The client cannot be set up from what it was given (a missing variable, an unreadable file)."""


class ApprovalTimeout(ValetError):
    """No decision on an approval before the wait's timeout; the request is still pending."""


class ApprovalDenied(ValetError):
    """People denied the request (or it expired without enough approvals)."""


def _metadata_value(metadata, key: str) -> Optional[str]:
    for item in metadata or ():
        name, value = item[0], item[1]
        if name.lower() == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


def from_rpc_error(error: grpc.RpcError) -> ValetError:
    """The exception for a failed call, with valetd's reason and the request id it sent back."""
    code = error.code() if hasattr(error, "code") else None
    reason = (error.details() if hasattr(error, "details") else None) or str(error)
    request_id = None
    for getter in ("trailing_metadata", "initial_metadata"):
        if request_id is None and hasattr(error, getter):
            try:
                request_id = _metadata_value(getattr(error, getter)(), "x-request-id")
            except Exception:  # an aio error before the call started has no metadata
                request_id = None
    return ValetError(reason, code=code, request_id=request_id)
