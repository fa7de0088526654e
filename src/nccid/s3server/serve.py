"""`nccid s3 serve`: run SeaweedFS in the foreground, keep it alive, sweep expired grants, stop cleanly.

The loop is a library function so that the CLI only parses options and prints the events it reports.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nccid.access.grants import Registry
from nccid.errors import ServerError
from nccid.log import event
from nccid.s3server.seaweedfs import SeaweedFS, ServerState, alive
from nccid.store.s3 import S3Store

#: restarts allowed within RESTART_WINDOW_S before the supervisor gives up and exits non-zero
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0

Report = Callable[[str], None]


@dataclass
class Watchdog:
    """Decides what to do when SeaweedFS is found dead: restart, unless it died too often lately (a pure rule
    over the times of earlier restarts)."""

    max_restarts: int = MAX_RESTARTS
    window_s: float = RESTART_WINDOW_S
    restarts: list[float] = field(default_factory=list)

    def may_restart(self, now: float) -> bool:
        """True (and the restart is counted) while fewer than `max_restarts` happened in the last window."""
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        return True


def _create_buckets(server: SeaweedFS, state: ServerState, buckets: list[str]) -> None:
    os.environ.update(server.admin_env())
    for name in buckets:
        S3Store(name, endpoint_url=state.endpoint).create_bucket()


def serve(
    server: SeaweedFS,
    *,
    buckets: list[str],
    stop: threading.Event,
    report: Report,
    sweep_interval: float = 60.0,
    check_interval: float = 1.0,
    watchdog: Watchdog | None = None,
) -> None:
    """Start `server`, create `buckets`, then until `stop` is set: every `check_interval` s make sure SeaweedFS is
    alive (restart it on the same S3 port, or raise ServerError once it died more than the watchdog allows), and
    every `sweep_interval` s expire grants past their date. `report` receives one line per event. The server is
    stopped on the way out, whatever the reason."""
    watchdog = watchdog or Watchdog()
    state = server.start()
    server.requested_port = state.s3_port  # a restart keeps the endpoint clients were given
    try:
        _create_buckets(server, state, buckets)
        report(f"S3 ready at {state.endpoint} (SeaweedFS pid {state.weed_pid}), buckets: {', '.join(buckets)}")
        report(f"home: {server.home}; administrator environment: nccid s3 env --home {server.home}")
        report("ready")
        registry = Registry(server)
        next_sweep = time.monotonic() + sweep_interval
        while not stop.wait(check_interval):
            if not alive(state.weed_pid):
                event("s3.died", pid=state.weed_pid)
                if not watchdog.may_restart(time.monotonic()):
                    raise ServerError(
                        f"SeaweedFS (pid {state.weed_pid}) died {watchdog.max_restarts + 1} times within "
                        f"{watchdog.window_s:.0f} s; giving up: see {server.home / 'weed.log'}"
                    )
                report(f"SeaweedFS (pid {state.weed_pid}) died; restarting it (see {server.home / 'weed.log'})")
                server.stop()
                state = server.start()
                report(f"S3 ready again at {state.endpoint} (SeaweedFS pid {state.weed_pid})")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + sweep_interval
                for grant in registry.sweep():
                    report(f"expired: {grant.access_key} ({grant.org}, {grant.group})")
    finally:
        server.stop()
