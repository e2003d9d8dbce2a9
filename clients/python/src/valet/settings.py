"""Where valetd is and how to prove who we are: the same variables as the `valet` CLI and the Rust
client (`VALET_SERVER`, `VALET_KEY`, `VALET_IDENTITY_TOKEN_FILE`, the GitHub Actions runner's OIDC
endpoint, `VALET_CA_FILE`, `VALET_CLIENT_CERT`, `VALET_CLIENT_KEY`)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import grpc

from valet.errors import ConfigurationError
from valet.secret import Secret

SERVER_ENV = "VALET_SERVER"
KEY_ENV = "VALET_KEY"
IDENTITY_TOKEN_FILE_ENV = "VALET_IDENTITY_TOKEN_FILE"
IDENTITY_AUDIENCE_ENV = "VALET_IDENTITY_AUDIENCE"
GITHUB_REQUEST_URL_ENV = "ACTIONS_ID_TOKEN_REQUEST_URL"
GITHUB_REQUEST_TOKEN_ENV = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
CA_FILE_ENV = "VALET_CA_FILE"
CLIENT_CERT_ENV = "VALET_CLIENT_CERT"
CLIENT_KEY_ENV = "VALET_CLIENT_KEY"
DEFAULT_SERVER = "http://127.0.0.1:7470"

#: A token file is re-read when the copy in memory is older than this (kubelet rotates projected
#: tokens well before they expire).
FILE_REREAD_SECONDS = 30.0
#: A token from the GitHub runner is requested again after this (they live about 5 minutes).
GITHUB_REFRESH_SECONDS = 120.0


class PrincipalKey:
    """A static principal key."""

    def __init__(self, key: Union[str, Secret]) -> None:
        self.key = key if isinstance(key, Secret) else Secret(key.strip())
        if not self.key:
            raise ConfigurationError("the principal key is empty")

    def authorization(self) -> str:
        return f"Bearer {self.key.reveal()}"

    def __repr__(self) -> str:
        return f"PrincipalKey({self.key!r})"


class IdentityTokenFile:
    """A workload identity token in a file the platform keeps fresh (a Kubernetes projected
    service-account token, a SPIFFE JWT-SVID), re-read every 30 s."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._current: Optional[str] = None
        self._read_at = 0.0
        self.authorization()  # a missing file is reported now, not at the first call

    def authorization(self) -> str:
        with self._lock:
            if self._current is None or time.monotonic() - self._read_at > FILE_REREAD_SECONDS:
                try:
                    with open(self.path, encoding="utf-8") as file:
                        token = file.read().strip()
                except OSError as error:
                    if self._current is None:
                        raise ConfigurationError(
                            f"cannot read the identity token file {self.path} ({IDENTITY_TOKEN_FILE_ENV}): {error}"
                        ) from error
                    token = ""
                if token:
                    self._current, self._read_at = f"Bearer {token}", time.monotonic()
                elif self._current is None:
                    raise ConfigurationError(f"the identity token file {self.path} is empty")
            return self._current

    def __repr__(self) -> str:
        return f"IdentityTokenFile({self.path!r})"


class GithubActions:
    """An OIDC token requested from the GitHub Actions runner for `audience`, refreshed every 2
    minutes (the job needs `permissions: id-token: write`)."""

    def __init__(self, audience: str = "valet", environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        self.audience = audience
        self._url = environ.get(GITHUB_REQUEST_URL_ENV, "")
        self._bearer = Secret(environ.get(GITHUB_REQUEST_TOKEN_ENV, ""))
        if not self._url or not self._bearer:
            raise ConfigurationError(
                f"{GITHUB_REQUEST_URL_ENV} and {GITHUB_REQUEST_TOKEN_ENV} are needed for a GitHub Actions identity "
                "token (does the job have `permissions: id-token: write`?)"
            )
        self._lock = threading.Lock()
        self._current: Optional[str] = None
        self._fetched_at = 0.0
        self.authorization()

    def _fetch(self) -> str:
        separator = "&" if "?" in self._url else "?"
        url = f"{self._url}{separator}audience={urllib.parse.quote(self.audience)}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._bearer.reveal()}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                value = json.load(answer).get("value", "")
        except (OSError, ValueError) as error:
            raise ConfigurationError(f"cannot get an identity token from the GitHub Actions runner: {error}") from error
        if not value:
            raise ConfigurationError("the GitHub Actions runner answered without a token")
        return value

    def authorization(self) -> str:
        with self._lock:
            if self._current is None or time.monotonic() - self._fetched_at > GITHUB_REFRESH_SECONDS:
                try:
                    self._current, self._fetched_at = f"Bearer {self._fetch()}", time.monotonic()
                except ConfigurationError:
                    if self._current is None:
                        raise
            return self._current

    def __repr__(self) -> str:
        return f"GithubActions(audience={self.audience!r})"


Credential = Union[PrincipalKey, IdentityTokenFile, GithubActions]


def credential_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Credential]:
    """The credential the environment offers, in the CLI's order: `VALET_KEY`,
    `VALET_IDENTITY_TOKEN_FILE`, the GitHub Actions runner. None when there is none."""
    environ = os.environ if environ is None else environ
    value = lambda name: (environ.get(name) or "").strip()  # noqa: E731
    if value(KEY_ENV):
        return PrincipalKey(value(KEY_ENV))
    if value(IDENTITY_TOKEN_FILE_ENV):
        return IdentityTokenFile(value(IDENTITY_TOKEN_FILE_ENV))
    if value(GITHUB_REQUEST_URL_ENV) and value(GITHUB_REQUEST_TOKEN_ENV):
        return GithubActions(value(IDENTITY_AUDIENCE_ENV) or "valet", environ)
    return None


@dataclass(frozen=True)
class Settings:
    """valetd's address (`http://HOST:PORT` or `https://HOST:PORT`), the credential, and TLS files."""

    server: str = DEFAULT_SERVER
    credential: Optional[Credential] = None
    ca_file: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    #: The name to check valetd's certificate for, when it is not the host in `server`.
    server_name: Optional[str] = field(default=None)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        environ = os.environ if environ is None else environ
        value = lambda name: (environ.get(name) or "").strip() or None  # noqa: E731
        settings = cls(
            server=value(SERVER_ENV) or DEFAULT_SERVER,
            credential=credential_from_env(environ),
            ca_file=value(CA_FILE_ENV),
            client_cert=value(CLIENT_CERT_ENV),
            client_key=value(CLIENT_KEY_ENV),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigurationError(f"{CLIENT_CERT_ENV} and {CLIENT_KEY_ENV} go together: set both or neither")
        if self.credential is None and not self.client_cert:
            raise ConfigurationError(
                f"no credential: set {KEY_ENV}, {IDENTITY_TOKEN_FILE_ENV}, run in GitHub Actions with "
                f"id-token permission, or present a client certificate ({CLIENT_CERT_ENV}, {CLIENT_KEY_ENV})"
            )
        if (self.ca_file or self.client_cert) and not self.secure:
            raise ConfigurationError(f"TLS files are set but {SERVER_ENV} is {self.server!r}: use https://")
        self.target  # noqa: B018 - checks the address

    @property
    def scheme(self) -> str:
        """`http` or `https`, in any case as written (URL schemes are case-insensitive); an address
        without one, or with another, is refused — never taken for plaintext — as the CLI does."""
        if "://" not in self.server:
            raise ConfigurationError(
                f"{SERVER_ENV} is {self.server!r}, which has no scheme; write https://HOST:PORT "
                "(or http://HOST:PORT for a plaintext loopback listener)"
            )
        scheme = self.server.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ConfigurationError(
                f"{SERVER_ENV} is {self.server!r}: the scheme {scheme}:// is not supported; "
                "use https:// (TLS) or http:// (plaintext)"
            )
        return scheme

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def target(self) -> str:
        scheme = self.scheme
        parsed = urllib.parse.urlsplit(f"{scheme}://{self.server.split('://', 1)[1]}")
        if not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ConfigurationError(
                f"{SERVER_ENV} must be http://HOST:PORT or https://HOST:PORT, and is {self.server!r}"
            )
        try:
            port = parsed.port or (443 if scheme == "https" else 80)
        except ValueError as error:
            raise ConfigurationError(f"{SERVER_ENV} is {self.server!r}: {error}") from error
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        return f"{host}:{port}"

    def _read(self, path: Optional[str], what: str) -> Optional[bytes]:
        if not path:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise ConfigurationError(f"cannot read the {what} {path}: {error}") from error

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_file, "CA file"),
            private_key=self._read(self.client_key, "client key"),
            certificate_chain=self._read(self.client_cert, "client certificate"),
        )

    def channel_options(self) -> list:
        options = [("grpc.keepalive_time_ms", 30_000)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def metadata(self) -> list:
        if self.credential is None:
            return []
        return [("authorization", self.credential.authorization())]
