"""gill: REQUEST (serialized gill.v1.ChatRequest) -> a stream of EVENT (serialized gill.v1.ChatEvent)."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import time  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill import protocol  # noqa: E402
from gill.errors import InputError  # noqa: E402
from gill.events import Done, ImageResult, TextDelta  # noqa: E402
from gill.limits import Limits  # noqa: E402
from gill.pipeline import Pipeline  # noqa: E402
from gill.serving import backend, progress  # noqa: E402
from gill.serving.remote import RemoteComponents, StageUnavailable, transport_from_parameters  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        self.limits = Limits.from_parameters(params)  # limit_* parameters; a bad one fails the model's load
        # How the stages reach the other models: BLS, or this server's gRPC endpoint (parameters transport, grpc_url).
        self.pipeline = Pipeline(RemoteComponents(params["checkpoint"], transport_from_parameters(params)))
        self.progress_dir = params.get("progress_dir")
        self.interval = float(params.get("stream_interval_ms", "50")) / 1000
        # A turn that sent nothing for this long gets an empty response: clients tell a slow turn from a lost one.
        heartbeat_s = float(params.get("heartbeat_s", "5"))
        # Busy while turns are in flight, a step per response sent: a stub that stops sending (frozen) is reloaded.
        self.progress = progress.Progress(params.get("progress_file") if heartbeat_s > 0 else None)
        self.heartbeats = backend.Heartbeats(heartbeat_s, self.progress)
        self.turns = backend.Counter("gill_turns_total", "Dialogue turns by outcome")
        self.images = backend.Counter("gill_images_total", "Images shown, by source")
        self.stage_seconds = backend.Counter("gill_stage_seconds_total", "Seconds spent per stage")

    def finalize(self):
        # The gRPC transport's channel to this server: closed before the server shuts its endpoint down.
        self.pipeline.components.transport.close()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            backend.serve_in_thread("gill-turn", lambda r=request, s=sender: self._beating(r, s), sender)
        return None

    def _beating(self, request, sender) -> None:
        # A turn whose llm or diffusion stub dies meanwhile may be waiting on a stream that never ends (Triton 2.51):
        # its heartbeats stop, and the client's idle timeout ends it (retryable) instead of its deadline.
        self.heartbeats.begin(sender, progress.stubs_alive(self.progress_dir, ("llm", "diffusion")))
        self.progress.begin()
        self.progress.step()  # a turn accepted is a sign of life: a stub frozen solid takes none
        try:
            self._turn(request, sender)
        finally:
            self.heartbeats.end(sender)  # before serve_in_thread sends FINAL
            self.progress.end()

    def _send(self, sender, event) -> None:
        data = event.SerializeToString()
        self.heartbeats.send(sender, pb_utils.InferenceResponse(
            [pb_utils.Tensor("EVENT", np.array([data], dtype=np.object_))]))

    def _turn(self, request, sender) -> None:
        started = time.perf_counter()
        try:
            raw = backend.optional_input(request, "REQUEST")
            if raw is None or raw.size != 1:
                raise InputError("REQUEST must hold exactly one serialized gill.v1.ChatRequest")
            chat = protocol.request_from_bytes(bytes(raw.reshape(-1)[0]), self.limits)
            parts = protocol.parts_from_request(chat, self.limits)
            options = protocol.options_from_request(chat, limits=self.limits)
            pending, last_sent = [], 0.0
            shown = protocol.shown_corpus_ids(chat)
            for event in self.pipeline.stream(parts, options, cancel=backend.checker(request), shown=shown):
                if isinstance(event, TextDelta):
                    # Text that arrives within the interval travels as one delta: each event costs a send.
                    pending.append(event.text)
                    if time.perf_counter() - last_sent < self.interval:
                        continue
                    event, pending = TextDelta("".join(pending)), []
                elif pending:
                    self._send(sender, protocol.event_to_proto(TextDelta("".join(pending))))
                    pending = []
                last_sent = time.perf_counter()
                if isinstance(event, ImageResult):
                    self.images.add(source=event.source)
                if isinstance(event, Done):
                    for stage, seconds in event.timings.items():
                        self.stage_seconds.add(seconds, stage=stage.removesuffix("_s"))
                    self.turns.add(outcome=event.stop_reason)
                message = protocol.event_to_proto(event)
                if message is not None:
                    self._send(sender, message)
        except InputError as error:
            self.turns.add(outcome="invalid")
            self._send(sender, protocol.error_event("INVALID_ARGUMENT", str(error)))
        except StageUnavailable as error:
            self.turns.add(outcome="unavailable")
            pb_utils.Logger.log_warn(f"turn failed: {error}")
            self._send(sender, protocol.error_event(
                "UNAVAILABLE", f"{error} (the server reloads a model whose process died; retry in a few seconds)"))
        except Exception as error:
            self.turns.add(outcome="error")
            pb_utils.Logger.log_error(f"turn failed after {time.perf_counter() - started:.2f} s: {error!r}")
            self._send(sender, protocol.error_event("INTERNAL", f"{type(error).__name__}: {error}"))
