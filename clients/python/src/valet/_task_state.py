"""What a task scope remembers, shared by the sync and asyncio tasks: the grants it holds (the
latest token of each), and which are due for renewal."""

from __future__ import annotations

import datetime
import signal
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


class TaskInterrupted(BaseException):
    """SIGTERM or SIGHUP arrived inside a task scope: raised in the main thread so the scope
    unwinds and revokes its grants, as KeyboardInterrupt does for SIGINT. The scope re-sends the
    signal once its grants are revoked, so the process still ends the way the signal says."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


#: The signals a task scope turns into TaskInterrupted (SIGINT is KeyboardInterrupt already).
TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class TerminationSignals:
    """While a task scope is open in the main thread, SIGTERM and SIGHUP raise TaskInterrupted
    there instead of killing the process on the spot — only where the application left the
    default action in place (a handler of its own is left alone: it decides). Elsewhere (another
    thread, where Python cannot install handlers) nothing changes: end the task yourself."""

    def __init__(self) -> None:
        self.installed: Dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, _frame):
            raise TaskInterrupted(signum)

        for signum in TERMINATING:
            if signal.getsignal(signum) is signal.SIG_DFL:
                self.installed[signum] = signal.signal(signum, interrupt)

    def restore(self) -> None:
        for signum, previous in self.installed.items():
            signal.signal(signum, previous)
        self.installed.clear()


def resend(error: Optional[BaseException]) -> None:
    """After the grants of a scope that a signal interrupted are revoked: the signal again, now
    with the handler the application had (the default: the process ends by it)."""
    if isinstance(error, TaskInterrupted):
        signal.raise_signal(error.signum)


def end_reason(error: Optional[BaseException]) -> str:
    if error is None:
        return "task ended"
    if isinstance(error, TaskInterrupted):
        return f"task interrupted by {error}"
    return f"task failed: {type(error).__name__}"
