"""A tritonserver that dies is started again on the same ports, with nothing of the dead one left behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from gill.serving.server import TritonServer
from gill.serving.supervisor import RestartPolicy, supervise


def _regions(server: TritonServer) -> list[str]:
    return sorted(path.name for path in Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def _config(server: TritonServer) -> int:
    return requests.get(f"{server.endpoints.http}/v2/models/mapper/config", timeout=5).status_code


def test_a_crashed_server_is_restarted_until_the_policy_gives_up(tiny_dir):
    server = TritonServer(tiny_dir, models=("mapper",), verify=False)
    server.start(timeout=240)
    try:
        returned: list[int] = []
        watcher = threading.Thread(target=lambda: returned.append(
            supervise(server, RestartPolicy(restarts=1, window_s=600, ready_timeout_s=240))), daemon=True)
        watcher.start()
        first = server.process.pid
        stubs = [child.pid for child in psutil.Process(first).children(recursive=True)]
        assert stubs and _regions(server), "the mapper stub runs and has its shared memory"
        dead_regions = set(_regions(server))

        # Killed as Triton 2.51 can die under load (SIGKILL: Triton's handler may outlive a SIGSEGV sent from outside).
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 240
        # Restarted once the new process's watchdog runs: restart() starts it when every model is ready.
        while not (server.process.pid != first and server.watchdog is not None) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.ready() and server.restarts == 1
        assert _config(server) == 200, "the same HTTP port serves the models again"
        assert not [pid for pid in stubs if psutil.pid_exists(pid)], "the dead server's stubs were killed"
        assert _regions(server) and not dead_regions & set(_regions(server)), "its shared memory was removed"
        assert "Started Metrics Service" in server.log_path.with_name("triton.log.1").read_text(), "its log was kept"

        os.kill(server.process.pid, signal.SIGKILL)  # the second death within the window is final
        watcher.join(60)
        assert returned == [-signal.SIGKILL]
    finally:
        server.close()
    assert _regions(server) == [], "close leaves no shared memory behind"
    assert server.process.poll() is not None


@pytest.mark.parametrize("bad", [dict(restarts=-1), dict(window_s=0), dict(ready_timeout_s=-5)])
def test_restart_policy_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="RestartPolicy"):
        RestartPolicy(**bad)
