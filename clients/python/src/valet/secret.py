"""A secret string that never prints: tokens and AWS secret keys. `reveal()` is the only way to
the value, so it never lands in a log line, a traceback or a repr by accident."""

from __future__ import annotations

import hashlib


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself: pass it only where it is needed (an Authorization header, an SDK)."""
        return self._value

    @property
    def fingerprint(self) -> str:
        """The first 6 bytes of its SHA-256, hex: what valetd's audit records name a token by."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret(<redacted>, fingerprint {self.fingerprint})" if self._value else "Secret(<empty>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret is not pickled")
