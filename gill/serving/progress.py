"""A stub's sign of life, through a small file the stub watchdog reads (gill/serving/watchdog.py).

While work is in flight the file reads ``busy <pid>`` and its mtime follows the last step; ``idle <pid>``
otherwise. Work whose steps stop while it is in flight is stuck: Triton 2.51 blocks a response send to a BLS
caller whose stub died, and with it the loop that sends (measured: the ``llm`` decode loop and the ``diffusion``
loop, after the ``gill`` stub died mid-turn). The watchdog then reloads the model. The pid tells a caller that
the stub its request may be waiting on has died since (:func:`stubs_alive`).

One file per model: the models that keep one (``llm``, ``diffusion``) run one instance each, as their configs
say. Written inside the stubs, read by ``gill serve``'s process and the ``gill`` stub: no Triton import here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

# Seconds a busy model may go without a step before it counts as stuck: far above a decode or denoising step on
# a GPU, and above a paper-scale step on a CPU; `gill serve --stall-timeout` sets it.
DEFAULT_STALL_S = 120.0


class Progress:
    """The writer, in a stub: :meth:`begin` and :meth:`end` bracket each unit of work (a turn, an image),
    :meth:`step` marks an advance (written at most every ``every`` s). No ``path``: off."""

    def __init__(self, path: str | Path | None, every: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.every = every
        self.active = 0
        self.written = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write("idle")  # a reloaded stub replaces its predecessor's state

    def begin(self) -> None:
        with self._lock:
            self.active += 1
            if self.active == 1:
                self._write("busy")

    def end(self) -> None:
        with self._lock:
            self.active -= 1
            if self.active == 0:
                self._write("idle")

    def step(self) -> None:
        if self.path is None or time.monotonic() - self.written < self.every:
            return
        with self._lock:
            if self.active:
                self._write("busy")

    def _write(self, state: str) -> None:
        if self.path is None:
            return
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(f"{state} {os.getpid()}")
        os.replace(partial, self.path)  # atomic: a reader never sees half a file
        self.written = time.monotonic()


@dataclass(frozen=True)
class State:
    busy: bool
    pid: int
    quiet_s: float  # seconds since the last write (the last step, while busy)


def read(path: Path) -> State | None:
    """The state a :class:`Progress` file records; None if there is none (yet)."""
    try:
        with open(path) as file:
            words, mtime = file.read().split(), os.fstat(file.fileno()).st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(words) != 2 or words[0] not in ("busy", "idle") or not words[1].isdigit():
        return None
    return State(words[0] == "busy", int(words[1]), max(0.0, time.time() - mtime))


def stubs_alive(progress_dir: str | Path | None, models: Iterable[str]) -> Callable[[], bool]:
    """A check that stays true while every stub serving ``models`` now (per their progress files) is alive, so a
    turn can tell that a stream it may be waiting on will never end: Triton 2.51 leaves the BLS streams of a dead
    stub open, and a request sent to a stuck stub never returns. Always true without progress files."""
    if not progress_dir:
        return lambda: True
    states = [read(Path(progress_dir) / model) for model in models]
    pids = [state.pid for state in states if state is not None and alive(state.pid)]  # a dead one answers at once
    return lambda: all(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
