"""One job at a time in a thread of the portal's server, its state kept for a status page.

Loads (nccid.portal.central) and validation runs (nccid.portal.validation_jobs) both run this way: a second
start while one runs is refused, and the page reads the job's fields while the thread fills them in.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Generic, Protocol, TypeVar


class Job(Protocol):
    """What the runner needs of a job's state: whether it is still running."""

    running: bool


JobT = TypeVar("JobT", bound=Job)


class OneAtATimeRunner(Generic[JobT]):
    """Runs `_run` (a subclass's work on `self.job`) in a daemon thread, never two at once."""

    def __init__(self, idle: JobT, thread_name: str) -> None:
        self.lock = threading.Lock()
        self.job: JobT = idle
        self.thread: threading.Thread | None = None
        self._thread_name = thread_name
        self._clock = 0.0

    def begin(self, job: JobT) -> bool:
        """Make `job` the current one and start `_run` in a new thread, unless a job is running; returns whether
        it started."""
        with self.lock:
            if self.job.running:
                return False
            self.job = job
            self._clock = time.monotonic()
            self.thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self.thread.start()
        return True

    def _run(self) -> None:
        raise NotImplementedError

    def _seconds(self) -> float:
        """Seconds since the current job started, to a tenth."""
        return round(time.monotonic() - self._clock, 1)

    def wait(self, timeout: float = 600) -> None:
        """Block until the current job's thread ends (or `timeout` seconds pass)."""
        deadline = time.monotonic() + timeout
        while self.thread is not None and self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(0.1)


def now() -> str:
    """The current UTC time in ISO 8601, to the second, as the status pages show it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
