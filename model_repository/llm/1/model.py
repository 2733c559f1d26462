"""llm: token ids with image slots (-1) + visual prefixes -> a stream of TOKENS / IMG_STATES responses.

Every dialogue turn joins one continuously batched decoding loop (gill.batching.ContinuousDecoder): the
turns in flight share each forward, and a new turn joins at the next step.
"""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.batching import ContinuousDecoder, RowImage, RowToken  # noqa: E402
from gill.decoding import Decoder  # noqa: E402
from gill.errors import InputError  # noqa: E402
from gill.model import GILL  # noqa: E402
from gill.options import GenerationOptions  # noqa: E402
from gill.serving import backend  # noqa: E402
from gill.serving.progress import Progress  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        self.model = GILL.from_checkpoint(params["checkpoint"], backend.device(args), parts=("lm",))
        self.interval = float(params.get("stream_interval_ms", "50")) / 1000
        self.decoder = Decoder(self.model.lm, self.model.tokens)
        self.steps = StepCounter()
        self.progress = Progress(params.get("progress_file"))  # for the stub watchdog: a stuck loop is reloaded
        self.engine = ContinuousDecoder(self.decoder, int(params.get("max_batch", "8")), on_step=self._stepped)
        self.cancels = backend.CancelRegistry()
        self.tokens_total = backend.Counter("gill_tokens_generated_total", "Tokens sampled by the LLM")

    def execute(self, requests):
        for request in requests:
            if backend.handle_control(request, self.cancels):
                continue
            sender = request.get_response_sender()
            try:
                prompt = self._prompt(request)
                if backend.scalar(request, "FORCE_IMAGE", False):
                    backend.serve_in_thread("gill-llm-image", lambda p=prompt, s=sender: self._image(p, s), sender)
                    continue
                try:
                    options = GenerationOptions.from_dict(json.loads(backend.scalar(request, "OPTIONS", "{}")))
                except json.JSONDecodeError as error:
                    raise InputError(f"OPTIONS is not valid JSON: {error}") from error
                flag = self.cancels.register(request.request_id())
                turn = Turn(sender, self.interval, self.tokens_total,
                            lambda rid=request.request_id(): self.cancels.release(rid), self.progress.end)
                self.progress.begin()
                try:
                    self.engine.submit(prompt, options, turn.emit, backend.checker(request, flag))
                except Exception:
                    self.progress.end()
                    raise
            except Exception as error:  # noqa: BLE001 - bad input ends this request only
                self.cancels.release(request.request_id())
                sender.send(backend.error_response(error), flags=backend.FINAL)
        return None

    def _stepped(self, rows: int) -> None:
        self.steps.add(rows)
        self.progress.step()

    def _prompt(self, request) -> torch.Tensor:
        ids = backend.optional_input(request, "INPUT_IDS")
        if ids is None or ids.size == 0:
            raise InputError("INPUT_IDS is missing or empty")
        prefixes = backend.torch_input(request, "VISUAL_PREFIX", self.model.device, required=False)
        if prefixes is not None and prefixes.numel() == 0:
            prefixes = None
        return self.model.embed_prompt(torch.from_numpy(ids.astype(np.int64)), prefixes)

    def _image(self, prompt: torch.Tensor, sender) -> None:
        states = self.decoder.image_states(prompt)
        sender.send(pb_utils.InferenceResponse([backend.tensor("IMG_STATES", states[None])]))

    def finalize(self):
        self.steps.flush()


class Turn:
    """One request's responses, fed by the decoding loop: TOKENS at most every ``interval`` s (tokens sampled
    within it travel together; the first, the last and those before an image go at once), IMG_STATES when an
    image's chunk went through the LM, FINAL at the end."""

    def __init__(self, sender, interval: float, tokens_total, release, ended) -> None:
        self.sender, self.interval, self.tokens_total = sender, interval, tokens_total
        self.release, self.ended = release, ended  # before the last sends, and after them
        self.pending: list[int] = []
        self.last_sent = 0.0

    def emit(self, event) -> None:
        if isinstance(event, RowToken):
            if event.token is not None:
                self.pending.append(event.token)
            if event.finished or time.monotonic() - self.last_sent >= self.interval:
                self._flush(event.finished or "")
        elif isinstance(event, RowImage):
            if self.pending:
                self._flush("")
            self.sender.send(pb_utils.InferenceResponse([backend.tensor("IMG_STATES", event.states[None])]))
        else:
            self.release()
            try:
                if event.error is not None:
                    self.sender.send(backend.error_response(event.error))
                self.sender.send(flags=backend.FINAL)
            finally:
                self.ended()

    def _flush(self, reason: str) -> None:
        outputs = [backend.tensor("TOKENS", np.array(self.pending, dtype=np.int64)),
                   backend.bytes_tensor("FINISH_REASON", [reason.encode()])]
        self.sender.send(pb_utils.InferenceResponse(outputs))
        if self.pending:  # a metric update is a message to the server too: one per response, not per token
            self.tokens_total.add(len(self.pending))
        self.pending, self.last_sent = [], time.monotonic()


class StepCounter:
    """Decode steps and the rows they carried (mean batch size = rows / steps), sent to the metrics at most once
    a second: a metric update is a message to the server, too many for every step."""

    def __init__(self) -> None:
        self.steps = backend.Counter("gill_llm_decode_steps_total", "Batched decode forwards run by the LLM")
        self.rows = backend.Counter("gill_llm_decode_rows_total", "Rows (dialogues) carried by those forwards")
        self.counts = [0, 0]
        self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.counts[0] += 1
        self.counts[1] += rows
        if time.monotonic() - self.last >= 1.0:
            self.flush()

    def flush(self) -> None:
        steps, rows = self.counts
        self.counts, self.last = [0, 0], time.monotonic()
        if steps:
            self.steps.add(steps)
            self.rows.add(rows)
