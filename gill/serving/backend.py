"""What the Python-backend models share: parameters, device, tensors, errors, cancellation, metrics.

Imported only inside Triton's Python backend stub (it needs ``triton_python_backend_utils``).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

from gill.errors import GillError, InputError
from gill.serving.progress import Progress
from gill.serving.transport import INPUT_ERROR_PREFIX

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def parameters(args: dict) -> dict[str, str]:
    """The model config's ``parameters`` as plain strings (checkpoint directory, retriever settings ...)."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def device(args: dict) -> torch.device:
    """The instance's device: ``cuda:<id>`` for KIND_GPU when CUDA is present, else the CPU."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device(f"cuda:{args['model_instance_device_id']}")
    return torch.device("cpu")


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request, name: str) -> np.ndarray:
    value = optional_input(request, name)
    if value is None:
        raise InputError(f"missing input tensor {name}")
    return value


def scalar(request, name: str, default: Any) -> Any:
    """The single value of an optional ``[1]`` (or batched ``[1, 1]``) input, or ``default``."""
    value = optional_input(request, name)
    if value is None or value.size == 0:
        return default
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else item.item()


def to_torch(value, device: torch.device | str | None = None) -> torch.Tensor:
    """A Triton tensor (an input, or a BLS response's output) as a torch tensor on ``device`` (where it lies when
    None). One on a GPU comes through DLPack without a copy; one on the CPU is copied out of the shared-memory
    region that holds it (that region is read-only and lives only as long as the request)."""
    if value.is_cpu():
        result = torch.from_numpy(value.as_numpy().copy())
    else:
        result = torch.utils.dlpack.from_dlpack(value.to_dlpack())
    return result if device is None else result.to(device)


def torch_input(request, name: str, device: torch.device | str | None, required: bool = True) -> torch.Tensor | None:
    """Input ``name`` as a torch tensor on ``device``; None when it is absent and not ``required``.

    With ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"`` in the model's config, a tensor that another model produced on a
    GPU arrives on that GPU and stays there (DLPack); without it Triton copies every input to the CPU first."""
    value = pb_utils.get_input_tensor_by_name(request, name)
    if value is None:
        if required:
            raise InputError(f"missing input tensor {name}")
        return None
    return to_torch(value, device)


def tensor(name: str, array: np.ndarray | torch.Tensor) -> Any:
    """A tensor to send (a response output or a BLS input). A torch tensor goes through DLPack without a copy (a
    CUDA tensor stays on its GPU); a floating-point one becomes float32 first, the TYPE_FP32 of every config
    (bf16 and fp16 are compute dtypes here, not wire types). numpy arrays (and torch bools, which DLPack
    exchange does not cover everywhere) go as numpy, dtype unchanged."""
    if isinstance(array, torch.Tensor):
        value = array.detach()
        if value.is_floating_point():
            value = value.float()
        if value.dtype != torch.bool:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        array = value.cpu().numpy()
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


def bytes_tensor(name: str, values: list[bytes], shape: tuple[int, ...] | None = None) -> Any:
    array = np.array(values, dtype=np.object_)
    return pb_utils.Tensor(name, array.reshape(shape) if shape else array)


def error_response(error: BaseException) -> Any:
    """A response carrying ``error``: INVALID_ARG for bad input, INTERNAL otherwise; the message starts with the
    error's type (``InputError: ...``), which is how a BLS caller tells them apart (Triton 2.51's BLS passes
    every error on as INTERNAL)."""
    if isinstance(error, InputError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(INPUT_ERROR_PREFIX + str(error),
                                                                     pb_utils.TritonError.INVALID_ARG))
    if not isinstance(error, GillError):
        pb_utils.Logger.log_error("".join(traceback.format_exception(error)))
    message = f"{type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


class CancelRegistry:
    """Cancellation flags keyed by request id.

    Triton 2.51's BLS response iterator cannot cancel the model it streams from, so the orchestrator sends
    a ``CANCEL`` control request carrying the id, and the working thread checks the flag every step.
    """

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def register(self, request_id: str) -> threading.Event:
        with self._lock:
            return self._flags.setdefault(request_id, threading.Event())

    def cancel(self, request_id: str) -> None:
        with self._lock:
            # A cancel may overtake the request it cancels: keep the flag so the request sees it when it starts.
            self._flags.setdefault(request_id, threading.Event()).set()

    def release(self, request_id: str) -> None:
        with self._lock:
            self._flags.pop(request_id, None)


CANCEL_POLL_S = 0.02


def checker(request, flag: threading.Event | None = None, poll_s: float = CANCEL_POLL_S) -> Callable[[], bool]:
    """True once the client cancelled this request or a ``CANCEL`` control request named it.

    ``request.is_cancelled()`` is a round trip to the server process: it is asked at most every ``poll_s``
    seconds (a decode step of a small model is a few ms, and asking every step cost about a fifth of the served
    tokens/s), so a client's cancel is seen within ``poll_s`` or one step, whichever is longer. The flag of a
    ``CANCEL`` control request is local and checked every time."""
    state = {"asked": 0.0, "cancelled": False}

    def cancelled() -> bool:
        if state["cancelled"] or (flag is not None and flag.is_set()):
            return True
        now = time.monotonic()
        if now - state["asked"] >= poll_s:
            state["asked"] = now
            state["cancelled"] = bool(request.is_cancelled())
        return state["cancelled"]

    return cancelled


def handle_control(request, registry: CancelRegistry) -> bool:
    """Serve a ``CANCEL`` control request (one final, empty response); False if this is a normal request."""
    target = scalar(request, "CANCEL", "")
    if not target:
        return False
    registry.cancel(target)
    request.get_response_sender().send(flags=FINAL)
    return True


def dispatch(requests, registry: CancelRegistry, name: str,
             work: Callable[[Any, Any, Callable[[], bool]], None]) -> None:
    """Serve decoupled requests: ``CANCEL`` control requests at once, every other one on its own thread as
    ``work(request, sender, cancel)``, with ``cancel()`` true once the client or a control request cancels it."""
    for request in requests:
        if handle_control(request, registry):
            continue
        sender = request.get_response_sender()

        def run(request=request, sender=sender) -> None:
            request_id = request.request_id()
            flag = registry.register(request_id)
            try:
                work(request, sender, checker(request, flag))
            finally:
                registry.release(request_id)

        serve_in_thread(name, run, sender)


def serve_in_thread(name: str, work: Callable[[], None], sender) -> None:
    """Run ``work`` on its own thread; a failure becomes an error response, and FINAL is always sent."""

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - every failure must reach the client, not hang it
            try:
                sender.send(error_response(error))
            except Exception:  # the client may be gone already
                pass
        finally:
            try:
                sender.send(flags=FINAL)
            except Exception:
                pass

    threading.Thread(target=run, name=name, daemon=True).start()


# One lock for every metrics call of the process: the stub sends each as a message through one shared buffer, and
# counters of different families are updated from different threads.
_METRICS_LOCK = threading.Lock()


class Counter:
    """A labelled Prometheus counter through the Python backend's metrics API; safe from any thread."""

    def __init__(self, name: str, description: str) -> None:
        with _METRICS_LOCK:
            self.family = pb_utils.MetricFamily(name=name, description=description,
                                                kind=pb_utils.MetricFamily.COUNTER)
        self._metrics: dict[tuple, Any] = {}

    def add(self, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with _METRICS_LOCK:
            metric = self._metrics.get(key)
            if metric is None:
                metric = self._metrics[key] = self.family.Metric(labels=dict(labels))
            metric.increment(value)


class Heartbeats:
    """Keeps quiet decoupled streams visibly alive: every ``interval`` s without a response, a turn gets an
    empty response (no outputs), which clients read as "still working". A client that hears nothing for much
    longer knows the turn is lost: Triton 2.51 leaves a stream open forever when its model's stub dies.

    Turns are known by their response sender: ``send(sender, response)`` serialises a turn's sends with its
    heartbeats; ``end(sender)`` before FINAL. A turn begun with ``alive`` gets no more heartbeats once ``alive()``
    is false (a stub it may be waiting on died), so that its client's idle timeout ends it. Every response sent,
    heartbeats included, is a step of ``progress`` (by default one with no file: nothing kept)."""

    def __init__(self, interval: float, progress: Progress | None = None) -> None:
        self.interval = interval
        self.progress = progress or Progress(None)
        self._turns: dict[object, list] = {}  # sender -> [lock, time of the last send]
        self._lock = threading.Lock()
        if interval > 0:
            threading.Thread(target=self._run, name="gill-heartbeats", daemon=True).start()

    def begin(self, sender, alive: Callable[[], bool] | None = None) -> None:
        with self._lock:
            self._turns[sender] = [threading.Lock(), time.monotonic(), alive]

    def send(self, sender, response) -> None:
        with self._lock:
            entry = self._turns.get(sender)
        if entry is None:
            raise RuntimeError("send after the turn ended")
        with entry[0]:
            sender.send(response)
            entry[1] = time.monotonic()
        self.progress.step()

    def end(self, sender) -> None:
        with self._lock:
            entry = self._turns.pop(sender, None)
        if entry is not None:
            with entry[0]:  # a heartbeat being sent finishes before FINAL goes out
                pass

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.interval))
            with self._lock:
                entries = list(self._turns.items())
            for sender, entry in entries:
                with entry[0]:
                    with self._lock:
                        if sender not in self._turns:
                            continue
                    if time.monotonic() - entry[1] >= self.interval and (entry[2] is None or entry[2]()):
                        try:
                            sender.send(pb_utils.InferenceResponse(output_tensors=[]))
                            entry[1] = time.monotonic()
                            self.progress.step()
                        except Exception:  # the client is gone; the turn notices through is_cancelled
                            pass
