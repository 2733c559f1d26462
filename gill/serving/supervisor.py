"""Keep ``tritonserver`` running: start it again when it dies without being asked to stop.

Triton 2.51 itself can die under load (a segmentation fault in the server while a model reloads, measured in
docs/reliability.md), and every model goes with it. The stub watchdog (gill/serving/watchdog.py) covers a model
whose stub dies; this covers the server. A restart reuses the ports, so clients reconnect by themselves (a
``GillClient`` retries UNAVAILABLE). A server that keeps dying is not restarted forever: after ``restarts``
restarts within ``window_s`` the next death is final and ``gill serve`` exits non-zero, for the process
supervisor (Kubernetes, systemd) to see.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass

from gill.serving.server import ServeError, TritonServer

log = logging.getLogger("gill.supervisor")

# How tritonserver ends when asked to stop (SIGINT or SIGTERM), or killed by them before it could handle them.
CLEAN_EXITS = (0, -signal.SIGINT, -signal.SIGTERM)


@dataclass(frozen=True)
class RestartPolicy:
    restarts: int = 5  # restarts allowed within window_s; 0 never restarts
    window_s: float = 600.0
    ready_timeout_s: float = 600.0  # for every model to be ready again

    def __post_init__(self) -> None:
        if self.restarts < 0 or self.window_s <= 0 or self.ready_timeout_s <= 0:
            raise ValueError(f"RestartPolicy needs restarts >= 0 and positive times, got {self}")


def supervise(server: TritonServer, policy: RestartPolicy = RestartPolicy()) -> int:
    """Wait on a started ``server``, restarting it as ``policy`` allows, until it stops for good. Returns the exit
    code of its last process: one of :data:`CLEAN_EXITS` when it was asked to stop, else the crash's code (1 when
    a restart itself failed)."""
    recent: deque[float] = deque()
    while True:
        code = server.wait()
        if server.stopping or code in CLEAN_EXITS:
            return code
        now = time.monotonic()
        while recent and now - recent[0] > policy.window_s:
            recent.popleft()
        if len(recent) >= policy.restarts:
            log.error("tritonserver exited with code %s; not restarting it (%d restart(s) in the last %.0f s, "
                      "at most %d allowed)", code, len(recent), policy.window_s, policy.restarts)
            return code
        recent.append(now)
        log.warning("tritonserver exited with code %s; restarting it on the same ports (restart %d of at most %d "
                    "in %.0f s). The end of its log:\n%s", code, len(recent), policy.restarts, policy.window_s,
                    server.log_excerpt())
        started = time.monotonic()
        try:
            server.restart(policy.ready_timeout_s)
        except ServeError as error:
            if server.stopping:
                return 0
            log.error("tritonserver could not be restarted: %s", error)
            return 1
        log.warning("tritonserver restarted: every model ready again after %.1f s", time.monotonic() - started)
