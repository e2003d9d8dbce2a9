"""Offline verification: a token checked against valetd's public keys (its JWKS), fetched once and
cached, and fetched again only when a token names a key the cache does not hold (after a rotation).
Pinned to EdDSA; the type, issuer, expiry, not-before and (when given) audience are checked. Offline
verification cannot see a revocation: ask `introspect` where that matters."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Tuple, Union

import jwt

from valet.errors import ValetError
from valet.secret import Secret

ALGORITHM = "EdDSA"
TOKEN_TYPE = "valet+jwt"
MAX_TOKEN_BYTES = 8 * 1024
#: Clock difference tolerated between valetd and this verifier.
DEFAULT_LEEWAY_SECONDS = 30
#: An unknown key id triggers a JWKS fetch once; the same id again only after this long.
UNKNOWN_KEY_RETRY_SECONDS = 30.0
#: At most this many fetches for unknown key ids per minute, however many ids tokens name.
MAX_REFRESHES_PER_MINUTE = 10

JwksFetch = Callable[[], Tuple[list, str]]


class VerificationError(ValetError):
    """The token does not verify; `reason` says which check failed."""


class OfflineVerifier:
    """Verifies tokens without a call per token. `fetch` returns (JWKS keys as dicts, issuer):
    `Client.verifier()` passes its `GetJwks` call."""

    def __init__(self, fetch: JwksFetch, leeway_seconds: int = DEFAULT_LEEWAY_SECONDS) -> None:
        self._fetch = fetch
        self._leeway = leeway_seconds
        self._lock = threading.Lock()
        self._keys: dict = {}
        self._issuer: Optional[str] = None
        self._fetched_at: Optional[float] = None
        self._unknown: dict = {}
        self._refreshes: list = []

    def refresh(self) -> None:
        """Fetches the JWKS again."""
        self.load(*self._fetch())

    def load(self, keys: list, issuer: str) -> None:
        """Takes `keys` (JWK dicts) and `issuer` as the current JWKS."""
        parsed = {}
        for key in keys:
            if key.get("kty") == "OKP" and key.get("crv") == "Ed25519" and key.get("kid"):
                parsed[key["kid"]] = jwt.PyJWK(key, algorithm=ALGORITHM)
        with self._lock:
            self._keys, self._issuer, self._fetched_at = parsed, issuer, time.monotonic()

    def _key(self, kid: str):
        now = time.monotonic()
        with self._lock:
            key = self._keys.get(kid)
            if key is not None:
                return key
            self._refreshes = [at for at in self._refreshes if now - at < 60]
            tried = self._unknown.get(kid)
            may_fetch = self._fetched_at is None or (
                (tried is None or now - tried > UNKNOWN_KEY_RETRY_SECONDS)
                and len(self._refreshes) < MAX_REFRESHES_PER_MINUTE
            )
            if may_fetch:
                self._refreshes.append(now)
        if not may_fetch:
            return None
        self.refresh()
        with self._lock:
            key = self._keys.get(kid)
            if key is None:
                if len(self._unknown) > 1000:
                    self._unknown.clear()
                self._unknown[kid] = now
            return key

    def verify(self, token: Union[str, Secret], audience: Optional[str] = None) -> dict:
        """The token's claims, once every check passes; `VerificationError` naming the first
        check that failed otherwise."""
        text = token.reveal() if isinstance(token, Secret) else token
        if len(text) > MAX_TOKEN_BYTES:
            raise VerificationError(f"the token is {len(text)} bytes; valet tokens are at most {MAX_TOKEN_BYTES}")
        try:
            header = jwt.get_unverified_header(text)
        except jwt.PyJWTError as error:
            raise VerificationError(f"the token is not a compact JWS: {error}") from None
        if header.get("alg") != ALGORITHM:
            raise VerificationError(f"the token's algorithm is {header.get('alg')!r}; valet tokens use {ALGORITHM}")
        if header.get("typ", TOKEN_TYPE) != TOKEN_TYPE:
            raise VerificationError(f"the token's header has typ {header.get('typ')!r}; valet tokens have typ {TOKEN_TYPE!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise VerificationError("the token's header names no key (kid)")
        key = self._key(kid)
        if key is None:
            raise VerificationError(f"the token was signed by key {kid!r}, which valetd does not publish")
        options = {"require": ["exp", "iat", "iss", "aud", "jti"], "verify_aud": audience is not None}
        try:
            return jwt.decode(
                text,
                key.key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise VerificationError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise VerificationError(f"the token is not for audience {audience!r}") from None
        except jwt.InvalidIssuerError:
            raise VerificationError(f"the token's issuer is not {self._issuer!r}") from None
        except jwt.PyJWTError as error:
            raise VerificationError(f"the token does not verify: {error}") from None
