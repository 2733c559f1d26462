"""Reload a Python-backend model whose stub process died, so that readiness tells the truth.

Triton 2.51 does not notice a dead stub: ``/v2/health/ready`` stays 200 and every request to the model fails
with "Stub process '<model>_0_0' is not healthy" until the server restarts (measured; see docs/reliability.md
and triton.md, "Stub crashes & false health"). The watchdog polls the server's child processes; when a stub of
a model is gone (or a zombie), it unloads the model, which makes the model and the server report not ready,
and loads it again, which starts a fresh stub. Triton then reports ready once the model has initialised.

It also reloads a model whose stub is alive but stuck: with ``progress_dir``, the models that keep a progress
file there (gill/serving/progress.py: the ``llm`` and ``diffusion`` loops) and stay busy without a step for
``stall_s`` seconds get their stub killed, then reloaded the same way. Measured cause (Triton 2.51): when the
``gill`` stub dies mid-turn, a response the ``llm`` or ``diffusion`` model sends to it never returns, and their
loops, which every other turn shares, stop with it.

This needs ``--model-control-mode=explicit`` (the server is started so): an unload and a load are the only
way to replace a model's stub without restarting every model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from gill.serving import progress
from gill.serving.progress import DEFAULT_STALL_S

log = logging.getLogger("gill.watchdog")


@dataclass
class Recovery:
    """One model reload after its stub died, or after it was killed for being stuck."""

    model: str
    dead_pids: tuple[int, ...]
    reason: str = "died"  # or "stuck"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finished is not None and self.error is None


def stub_model(cmdline: list[str], repository: Path) -> str | None:
    """The model a ``triton_python_backend_stub`` process serves (from its ``<repository>/<model>/<version>/
    model.py`` argument), or None for any other process."""
    if not cmdline or not cmdline[0].endswith("triton_python_backend_stub") or len(cmdline) < 2:
        return None
    try:
        relative = Path(cmdline[1]).resolve().relative_to(repository)
    except ValueError:
        return None
    return relative.parts[0] if relative.parts else None


def live_stubs(server: psutil.Process, repository: Path) -> dict[str, list[psutil.Process]]:
    """The running stub processes under ``server`` per model name; zombies (dead, not yet reaped by Triton) and
    processes that vanish while being read do not count."""
    found: dict[str, list[psutil.Process]] = {}
    for child in server.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            model = stub_model(child.cmdline(), repository)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if model is not None:
            found.setdefault(model, []).append(child)
    return found


class StubWatchdog:
    """Watches the stubs of ``models`` under the ``tritonserver`` process ``pid``; ``control(action, model)``
    posts ``load`` or ``unload`` to Triton's model-repository API and raises on failure. With ``progress_dir``,
    also the progress files there (one per model, named after it)."""

    def __init__(self, pid: int, repository: Path, models: Iterable[str], control: Callable[[str, str], None],
                 interval: float = 1.0, load_timeout: float = 600.0, progress_dir: Path | None = None,
                 stall_s: float = DEFAULT_STALL_S) -> None:
        self.repository = repository.resolve()
        self.models = frozenset(models)
        self.control = control
        self.interval = interval
        self.load_timeout = load_timeout
        self.progress_dir = progress_dir
        self.stall_s = stall_s
        self.recoveries: list[Recovery] = []
        self._server = psutil.Process(pid)
        self._known: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gill-stub-watchdog", daemon=True)

    def start(self) -> None:
        """Record the stubs running now (the models are loaded), then poll in a daemon thread."""
        self._known = self._stubs()
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop polling (before the server shuts down, whose stubs then exit); ``wait=False`` in a signal
        handler."""
        self._stop.set()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _stubs(self) -> dict[str, set[int]]:
        """Live stub pids per watched model."""
        live = live_stubs(self._server, self.repository)
        return {model: {stub.pid for stub in live.get(model, [])} for model in self.models}

    def check(self) -> list[str]:
        """One poll: the models whose stubs died since the last poll, or are stuck (each is then reloaded)."""
        current = self._stubs()
        dead = []
        for model, pids in current.items():
            lost = self._known.get(model, set()) - pids
            if lost and not self._stop.is_set():  # stopping: Triton's shutdown ends every stub
                dead.append(model)
                self._recover(model, tuple(sorted(lost)))
                current[model] = self._stubs()[model]
            elif pids and not self._stop.is_set() and self._stuck(model, pids):
                dead.append(model)
                self._kill(pids)
                self._recover(model, tuple(sorted(pids)), reason="stuck")
                current[model] = self._stubs()[model]
            self._known[model] = current[model]
        return dead

    def _stuck(self, model: str, pids: set[int]) -> bool:
        """Whether the model's stub has had work in flight and no step for ``stall_s`` seconds."""
        if self.progress_dir is None:
            return False
        state = progress.read(self.progress_dir / model)
        if state is None or not state.busy or state.quiet_s < self.stall_s or state.pid not in pids:
            return False
        log.error("model %s: busy without a step for %.0f s (stall timeout %g s): its stub %d is stuck; killing it",
                  model, state.quiet_s, self.stall_s, state.pid)
        return True

    @staticmethod
    def _kill(pids: set[int], timeout: float = 10.0) -> None:
        """SIGKILL the stubs and wait until they are gone or zombies (Triton reaps them; dead all the same)."""
        processes = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                process.kill()
                processes.append(process)
            except psutil.NoSuchProcess:
                continue
        deadline = time.monotonic() + timeout
        for process in processes:
            while progress.alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _recover(self, model: str, pids: tuple[int, ...], reason: str = "died") -> None:
        recovery = Recovery(model, pids, reason=reason)
        self.recoveries.append(recovery)
        if reason == "died":
            log.error("model %s: stub process %s died; reloading the model (not ready until it is back)",
                      model, ", ".join(map(str, pids)))
        else:
            log.error("model %s: reloading the model after killing its stuck stub (not ready until it is back)",
                      model)
        try:
            self.control("unload", model)
            self.control("load", model)
        except Exception as error:  # keep watching: a later poll retries once the stub is gone again
            recovery.error = f"{type(error).__name__}: {error}"
            log.error("model %s: reload failed: %s", model, recovery.error)
        recovery.finished = time.time()
        if recovery.ok:
            log.warning("model %s: reloaded in %.1f s", model, recovery.finished - recovery.started)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._server.is_running():
                    return
                self.check()
            except psutil.NoSuchProcess:
                return
            except Exception:  # the watchdog must outlive any one bad poll
                log.exception("stub watchdog poll failed")


def http_control(base_url: str, headers: dict[str, str], timeout: float) -> Callable[[str, str], None]:
    """``control(action, model)`` over Triton's HTTP model-repository API."""

    def control(action: str, model: str) -> None:
        response = requests.post(f"{base_url}/v2/repository/models/{model}/{action}", json={}, headers=headers,
                                 timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"{action} {model}: HTTP {response.status_code} {response.text.strip()}")

    return control
