"""The stub watchdog on stand-in stub processes: which deaths it notices and what it asks Triton to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gill.serving import progress
from gill.serving.progress import Progress
from gill.serving.watchdog import StubWatchdog, stub_model


def _fake_stub(repository: Path, model: str) -> subprocess.Popen:
    """A process whose command line reads like Triton's stub: ``.../triton_python_backend_stub <model.py>``."""
    script = repository / model / "1" / "model.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(120)\n")
    return subprocess.Popen(["/backends/python/triton_python_backend_stub", str(script), "shm-region"],
                            executable=sys.executable)


def test_stub_model_reads_the_model_from_the_stub_command_line(tmp_path):
    stub = "/b/python/triton_python_backend_stub"
    assert stub_model([stub, str(tmp_path / "mapper/1/model.py"), "x"], tmp_path) == "mapper"
    assert stub_model([stub, "/elsewhere/mapper/1/model.py"], tmp_path) is None
    assert stub_model(["/usr/bin/python", str(tmp_path / "mapper/1/model.py")], tmp_path) is None
    assert stub_model([], tmp_path) is None


@pytest.fixture
def stubs(tmp_path):
    running = {model: _fake_stub(tmp_path, model) for model in ("mapper", "llm")}
    yield running
    for process in running.values():
        process.kill()
        process.wait()


def test_a_dead_stub_is_unloaded_then_loaded_and_others_are_left_alone(tmp_path, stubs):
    calls = []
    watchdog = StubWatchdog(os.getpid(), tmp_path, ["mapper", "llm"],
                            lambda action, model: calls.append((action, model)))
    watchdog._known = watchdog._stubs()
    assert watchdog._known == {"mapper": {stubs["mapper"].pid}, "llm": {stubs["llm"].pid}}
    assert watchdog.check() == [] and calls == []
    stubs["mapper"].kill()
    stubs["mapper"].wait()
    assert watchdog.check() == ["mapper"]
    assert calls == [("unload", "mapper"), ("load", "mapper")]
    [recovery] = watchdog.recoveries
    assert recovery.ok and recovery.dead_pids == (stubs["mapper"].pid,)
    assert watchdog.check() == []  # noticed once, not on every poll


def test_a_failed_reload_is_recorded_and_the_watchdog_keeps_going(tmp_path, stubs):
    def refuse(action, model):
        raise RuntimeError(f"{action} {model}: HTTP 400")

    watchdog = StubWatchdog(os.getpid(), tmp_path, ["mapper", "llm"], refuse)
    watchdog._known = watchdog._stubs()
    stubs["llm"].kill()
    stubs["llm"].wait()
    assert watchdog.check() == ["llm"]
    [recovery] = watchdog.recoveries
    assert not recovery.ok and "HTTP 400" in recovery.error


def test_a_stopped_watchdog_reloads_nothing(tmp_path, stubs):
    calls = []
    watchdog = StubWatchdog(os.getpid(), tmp_path, ["mapper"], lambda action, model: calls.append(action))
    watchdog.start()
    watchdog.stop()  # the server is shutting down: its stubs exit on purpose
    stubs["mapper"].kill()
    stubs["mapper"].wait()
    assert watchdog.check() == [] and calls == []


def test_progress_files_say_busy_while_work_is_in_flight_and_follow_its_steps(tmp_path):
    path = tmp_path / "progress" / "llm"
    tracker = Progress(path, every=0.0)
    state = progress.read(path)
    assert (state.busy, state.pid) == (False, os.getpid())
    tracker.begin()
    tracker.begin()
    tracker.end()
    assert progress.read(path).busy  # one unit of work still in flight
    os.utime(path, (0, 0))  # as if the last step were long ago
    assert progress.read(path).quiet_s > 1e6
    tracker.step()
    assert progress.read(path).quiet_s < 60
    tracker.end()
    assert not progress.read(path).busy
    Progress(None).begin()  # no path: nothing kept, nothing raised
    path.write_text("half a line")
    assert progress.read(path) is None and progress.read(tmp_path / "missing") is None


def _stall(tmp_path, model: str, state: str, pid: int, quiet_s: float) -> None:
    path = tmp_path / "progress" / model
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"{state} {pid}")
    os.utime(path, (time.time() - quiet_s, time.time() - quiet_s))


def test_a_stub_busy_without_a_step_for_the_stall_timeout_is_killed_and_reloaded(tmp_path, stubs):
    calls = []
    watchdog = StubWatchdog(os.getpid(), tmp_path, ["mapper", "llm"],
                            lambda action, model: calls.append((action, model)),
                            progress_dir=tmp_path / "progress", stall_s=30)
    watchdog._known = watchdog._stubs()
    _stall(tmp_path, "mapper", "idle", stubs["mapper"].pid, 300)  # idle for long: nothing to do
    _stall(tmp_path, "llm", "busy", stubs["llm"].pid, 10)  # busy, stepped 10 s ago: working
    assert watchdog.check() == [] and calls == []
    _stall(tmp_path, "llm", "busy", 1, 300)  # another process's file (a stub since replaced): not this one's
    assert watchdog.check() == [] and calls == []
    _stall(tmp_path, "llm", "busy", stubs["llm"].pid, 31)
    assert watchdog.check() == ["llm"]
    assert calls == [("unload", "llm"), ("load", "llm")]
    assert stubs["llm"].wait(timeout=10) == -signal.SIGKILL
    [recovery] = watchdog.recoveries
    assert recovery.ok and recovery.reason == "stuck" and recovery.dead_pids == (stubs["llm"].pid,)
    assert watchdog.check() == []  # the dead stub is not noticed a second time


def test_a_turn_can_tell_that_a_stub_serving_it_has_died(tmp_path, stubs):
    _stall(tmp_path, "llm", "busy", stubs["llm"].pid, 0)
    _stall(tmp_path, "diffusion", "idle", 999_999_999, 0)  # already dead when the turn begins: not watched
    alive = progress.stubs_alive(tmp_path / "progress", ("llm", "diffusion", "missing"))
    assert alive()
    stubs["llm"].kill()
    stubs["llm"].wait()
    assert not alive()
    assert progress.stubs_alive(None, ("llm",))()  # no progress files: nothing to tell
