"""The records the client hands back: grants, approvals, issued tokens, AWS credentials, answers to
introspection and revocation. Plain frozen dataclasses built from the wire messages; the secret
parts are `Secret`s, so no repr shows them."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from valet.secret import Secret

GRANT_STATUSES = {0: "unspecified", 1: "pending", 2: "active", 3: "revoked", 4: "expired", 5: "denied"}
APPROVAL_STATUSES = {0: "unspecified", 1: "pending", 2: "approved", 3: "denied", 4: "expired", 5: "consumed"}


def _present(message: Any, name: str) -> bool:
    """Whether `message` has the field `name` and it is set (replies differ in which they have)."""
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def _time(message: Any, name: str) -> Optional[datetime.datetime]:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return datetime.datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=datetime.timezone.utc)


@dataclass(frozen=True)
class Grant:
    """The durable record of one issued token (never the token itself)."""

    id: str
    principal: str
    task_id: str
    purpose: str
    scope: str
    environment: str
    audience: str
    params: Mapping[str, str]
    issued_at: Optional[datetime.datetime]
    expires_at: Optional[datetime.datetime]
    max_expires_at: Optional[datetime.datetime]
    uses: int
    max_uses: Optional[int]
    status: str
    status_reason: str
    key_id: str

    @classmethod
    def from_wire(cls, wire: Any) -> "Grant":
        return cls(
            id=wire.id,
            principal=wire.principal,
            task_id=wire.task_id,
            purpose=wire.purpose,
            scope=wire.scope,
            environment=wire.environment,
            audience=wire.audience,
            params=dict(wire.params),
            issued_at=_time(wire, "issued_at"),
            expires_at=_time(wire, "expires_at"),
            max_expires_at=_time(wire, "max_expires_at"),
            uses=wire.uses,
            max_uses=wire.max_uses or None,
            status=GRANT_STATUSES.get(wire.status, "unspecified"),
            status_reason=wire.status_reason,
            key_id=wire.key_id,
        )


@dataclass(frozen=True)
class ApprovalCall:
    """The exact gateway call a per-call approval covers."""

    method: str
    target: str
    body_sha256: str
    graphql: tuple
    content_type: str
    rendering: str
    calls: tuple


@dataclass(frozen=True)
class Approval:
    """A request waiting for people: a token for a sensitive scope, or one exact gateway call."""

    id: str
    kind: str
    grant_id: str
    requester: str
    scope: str
    environment: str
    task_id: str
    purpose: str
    params: Mapping[str, str]
    call: Optional[ApprovalCall]
    created_at: Optional[datetime.datetime]
    expires_at: Optional[datetime.datetime]
    required: int
    approvers: tuple
    confirm: str
    status: str
    status_reason: str
    summary: str
    #: What is asked, every part of it, as the approver sees it.
    rendered: str
    approve_command: str

    @classmethod
    def from_wire(cls, wire: Any) -> "Approval":
        call = None
        if wire.HasField("call"):
            call = ApprovalCall(
                method=wire.call.method,
                target=wire.call.target,
                body_sha256=wire.call.body_sha256,
                graphql=tuple(wire.call.graphql),
                content_type=wire.call.content_type,
                rendering=wire.call.rendering,
                calls=tuple(wire.call.calls),
            )
        return cls(
            id=wire.id,
            kind=wire.kind,
            grant_id=wire.grant_id,
            requester=wire.requester,
            scope=wire.scope,
            environment=wire.environment,
            task_id=wire.task_id,
            purpose=wire.purpose,
            params=dict(wire.params),
            call=call,
            created_at=_time(wire, "created_at"),
            expires_at=_time(wire, "expires_at"),
            required=wire.required,
            approvers=tuple(wire.approvers),
            confirm=wire.confirm,
            status=APPROVAL_STATUSES.get(wire.status, "unspecified"),
            status_reason=wire.status_reason,
            summary=wire.summary,
            rendered=wire.rendered,
            approve_command=wire.approve_command,
        )

    @property
    def decided(self) -> bool:
        return self.status not in ("pending", "unspecified")


@dataclass(frozen=True)
class AwsCredentials:
    """Temporary AWS credentials from STS, narrowed to the grant's scope."""

    access_key_id: str
    secret_access_key: Secret = field(repr=False)
    session_token: Secret = field(repr=False)
    expires_at: Optional[datetime.datetime]
    region: str
    assumed_role_arn: str
    #: What their lifetime and revocation mean, in plain words.
    notice: str

    @classmethod
    def from_wire(cls, wire: Any) -> "AwsCredentials":
        return cls(
            access_key_id=wire.access_key_id,
            secret_access_key=Secret(wire.secret_access_key),
            session_token=Secret(wire.session_token),
            expires_at=_time(wire, "expires_at"),
            region=wire.region,
            assumed_role_arn=wire.assumed_role_arn,
            notice=wire.notice,
        )

    def environment(self) -> dict:
        """The variables the AWS CLI and SDKs read credentials from (values revealed: hand the
        dict to a subprocess's environment, not to a log)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key.reveal(),
            "AWS_SESSION_TOKEN": self.session_token.reveal(),
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def boto3_session(self, **overrides: Any) -> Any:
        """A `boto3.Session` on these credentials (needs boto3: `pip install valet-client[aws]`)."""
        try:
            import boto3
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("boto3 is needed for boto3_session(): pip install 'valet-client[aws]'") from error
        arguments = {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key.reveal(),
            "aws_session_token": self.session_token.reveal(),
            "region_name": self.region or None,
        }
        arguments.update(overrides)
        return boto3.Session(**arguments)


@dataclass(frozen=True)
class IssuedToken:
    """A grant and its token; or, for a scope that needs approval, the pending grant and its
    approval request (no token until people approve: `Client.wait_for_grant`)."""

    grant: Grant
    token: Optional[Secret] = field(repr=False)
    approval: Optional[Approval] = None
    aws: Optional[AwsCredentials] = None

    @property
    def pending(self) -> bool:
        return self.approval is not None and not self.token

    @classmethod
    def from_wire(cls, wire: Any) -> "IssuedToken":
        return cls(
            grant=Grant.from_wire(wire.grant),
            token=Secret(wire.token) if wire.token else None,
            approval=Approval.from_wire(wire.approval) if _present(wire, "approval") else None,
            aws=AwsCredentials.from_wire(wire.aws) if _present(wire, "aws") else None,
        )


@dataclass(frozen=True)
class Introspection:
    """Whether a token is active; the grant when it verified; why not, when it is not."""

    active: bool
    grant: Optional[Grant]
    reason: str

    @classmethod
    def from_wire(cls, wire: Any) -> "Introspection":
        return cls(
            active=wire.active,
            grant=Grant.from_wire(wire.grant) if wire.HasField("grant") else None,
            reason=wire.reason,
        )


@dataclass(frozen=True)
class Revoked:
    """A revoked grant, and what the revocation means outside Valet when that needs saying."""

    grant: Grant
    notice: Optional[str]
