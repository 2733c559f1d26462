"""llm: token ids with image slots (-1) + visual prefixes -> a stream of TOKENS / IMG_STATES responses."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.decoding import Decoder, TokenStep  # noqa: E402
from gill.errors import InputError  # noqa: E402
from gill.model import GILL  # noqa: E402
from gill.options import GenerationOptions  # noqa: E402
from gill.serving import backend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        self.model = GILL.from_checkpoint(params["checkpoint"], backend.device(args), parts=("lm",))
        self.interval = float(params.get("stream_interval_ms", "50")) / 1000
        self.decoder = Decoder(self.model.lm, self.model.tokens)
        self.cancels = backend.CancelRegistry()
        self.tokens_total = backend.Counter("gill_tokens_generated_total", "Tokens sampled by the LLM")

    def execute(self, requests):
        backend.dispatch(requests, self.cancels, "gill-llm", self._serve)
        return None

    def _prompt(self, request) -> torch.Tensor:
        ids = backend.optional_input(request, "INPUT_IDS")
        if ids is None or ids.size == 0:
            raise InputError("INPUT_IDS is missing or empty")
        prefix = backend.optional_input(request, "VISUAL_PREFIX")
        prefixes = None if prefix is None or prefix.size == 0 else torch.from_numpy(prefix.copy())
        return self.model.embed_prompt(torch.from_numpy(ids.astype(np.int64)), prefixes)

    def _serve(self, request, sender, cancel) -> None:
        prompt = self._prompt(request)
        if backend.scalar(request, "FORCE_IMAGE", False):
            states = self.decoder.image_states(prompt)
            sender.send(pb_utils.InferenceResponse([backend.tensor("IMG_STATES", states[None])]))
            return
        try:
            options = GenerationOptions.from_dict(json.loads(backend.scalar(request, "OPTIONS", "{}")))
        except json.JSONDecodeError as error:
            raise InputError(f"OPTIONS is not valid JSON: {error}") from error
        pending, last_sent = [], 0.0

        def flush(reason: str) -> None:
            nonlocal pending, last_sent
            outputs = [backend.tensor("TOKENS", np.array(pending, dtype=np.int64)),
                       backend.bytes_tensor("FINISH_REASON", [reason.encode()])]
            sender.send(pb_utils.InferenceResponse(outputs))
            if pending:  # a metric update is a message to the server too: one per response, not per token
                self.tokens_total.add(len(pending))
            pending, last_sent = [], time.monotonic()

        for step in self.decoder.stream([prompt], options, cancel):
            if isinstance(step, TokenStep):
                if step.tokens[0] is not None:
                    pending.append(step.tokens[0])
                reason = step.finished[0] or ""
                if reason or time.monotonic() - last_sent >= self.interval:
                    flush(reason)
            else:
                if pending:
                    flush("")
                sender.send(pb_utils.InferenceResponse([backend.tensor("IMG_STATES", step.states[0][None])]))
