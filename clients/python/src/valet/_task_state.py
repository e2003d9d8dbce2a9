"""What a task scope remembers, shared by the sync and asyncio tasks: the grants it holds (the
latest token of each), and which are due for renewal."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from valet._calls import Ttl
from valet.records import IssuedToken

#: A grant is renewed once less than this share of its lifetime is left.
RENEW_WHEN_LEFT = 1 / 3


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass
class Held:
    issued: IssuedToken
    ttl: Ttl
    since: datetime.datetime
    renewing: bool = True


class TaskState:
    def __init__(self, task_id: str) -> None:
        if not task_id:
            raise ValueError("a task needs an id")
        self.task_id = task_id
        self._lock = threading.Lock()
        self._held: Dict[str, Held] = {}

    def hold(self, issued: IssuedToken, ttl: Ttl) -> None:
        with self._lock:
            self._held[issued.grant.id] = Held(issued, ttl, _now())

    def current(self, grant_id: str) -> Optional[IssuedToken]:
        with self._lock:
            held = self._held.get(grant_id)
            return held.issued if held else None

    def grants(self) -> List[IssuedToken]:
        with self._lock:
            return [held.issued for held in self._held.values()]

    def due(self, now: Optional[datetime.datetime] = None) -> List[Tuple[str, Ttl]]:
        """Grants with less than a third of their lifetime left, that can still be renewed."""
        now = now or _now()
        due = []
        with self._lock:
            for grant_id, held in self._held.items():
                grant = held.issued.grant
                if not held.renewing or grant.expires_at is None or held.issued.token is None:
                    continue
                if grant.max_expires_at is not None and grant.expires_at >= grant.max_expires_at:
                    held.renewing = False  # at its maximum lifetime: nothing to gain
                    continue
                lifetime = (grant.expires_at - held.since).total_seconds()
                left = (grant.expires_at - now).total_seconds()
                if left <= max(lifetime, 0) * RENEW_WHEN_LEFT:
                    due.append((grant_id, held.ttl))
        return due

    def renewed(self, issued: IssuedToken) -> None:
        with self._lock:
            held = self._held.get(issued.grant.id)
            if held is not None:
                held.issued, held.since = issued, _now()

    def stop_renewing(self, grant_id: str) -> None:
        with self._lock:
            held = self._held.get(grant_id)
            if held is not None:
                held.renewing = False


def end_reason(error: Optional[BaseException]) -> str:
    if error is None:
        return "task ended"
    return f"task failed: {type(error).__name__}"
