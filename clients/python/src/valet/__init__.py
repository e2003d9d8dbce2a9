"""Valet's Python client: short-lived, scoped tokens for agent tasks from valetd, instead of root
credentials in the agent's reach.

    import valet
    client = valet.Client.from_env()
    with client.task("fix-dns-42") as task:
        issued = task.request_token("dns-staging", params={"zone": "staging.example.com"})
        ...  # every grant of the task is revoked when the block exits, however it exits

`valet.aio.AsyncClient` offers the same with asyncio; `valet.gateway` has auth objects for
`requests` and `httpx` that wait for a call's approval and retry it once.
"""

from valet.client import Client, Task
from valet.errors import ApprovalDenied, ApprovalTimeout, ConfigurationError, ValetError
from valet.secret import Secret
from valet.settings import GithubActions, IdentityTokenFile, PrincipalKey, Settings
from valet.records import Approval, AwsCredentials, Grant, Introspection, IssuedToken, Revoked
from valet.verify import OfflineVerifier, VerificationError

__all__ = [
    "ApprovalDenied",
    "ApprovalTimeout",
    "Approval",
    "AwsCredentials",
    "Client",
    "ConfigurationError",
    "GithubActions",
    "Grant",
    "IdentityTokenFile",
    "Introspection",
    "IssuedToken",
    "OfflineVerifier",
    "PrincipalKey",
    "Revoked",
    "Secret",
    "Settings",
    "Task",
    "ValetError",
    "VerificationError",
]
