"""The orchestrator's :class:`~gill.components.Components`: each stage is a BLS call to another Triton model.

Imported only inside Triton's Python backend. Sub-requests get their own ids so that a ``CANCEL`` control
request can stop the ``llm`` or ``diffusion`` work behind them: the response iterator of Triton 2.51 has no
``cancel()``, and leaving its loop would let the model run on.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from PIL import Image

from gill.components import Prompt
from gill.config import GILLArgs, resolve_source
from gill.decoding import CancelCheck, ImageStates, TokenStep
from gill.diffusion import PreviewCallback
from gill.errors import GillError, InputError
from gill.images import load_image, png_bytes
from gill.model import Decision
from gill.options import GenerationOptions
from gill.retrieval import RETRIEVAL_CANDIDATES, Hit, RetrievalFailed, RetrievalUnavailable
from gill.serving import backend
from gill.tokens import load_tokenizer

CLIP_MAX_BATCH = 8  # model_repository/clip/config.pbtxt max_batch_size


class StageError(GillError):
    """A downstream model answered with an error."""


class StageUnavailable(StageError):
    """A downstream model cannot serve right now: its stub process died (the watchdog is reloading it) or it
    is not loaded. Transient: the client may retry the turn."""


# How Triton words "this model cannot take requests now" (a dead stub, an unloaded or loading model).
_UNAVAILABLE = ("is not healthy", "is not ready", "is not found", "unknown model")


def _output(response, name: str) -> np.ndarray | None:
    """Output ``name`` as numpy (copied off the GPU if the model produced it there: ``as_numpy`` cannot)."""
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        return None
    return tensor.as_numpy() if tensor.is_cpu() else backend.to_torch(tensor).cpu().numpy()


def _tensor_output(response, name: str) -> torch.Tensor:
    """Float output ``name`` as torch, where the model left it: a CUDA tensor stays on its GPU (DLPack, no copy),
    so the [IMG] states and prompt embeddings go llm -> mapper -> diffusion without a trip through host memory."""
    return backend.to_torch(pb_utils.get_output_tensor_by_name(response, name))


def _check(response, model: str) -> None:
    if response.has_error():
        message = response.error().message()
        code = str(response.error().code())
        # Triton 2.51's BLS hands every error over as INTERNAL (the code is lost, the message kept), so bad input
        # is also known by the prefix backend.error_response gives it.
        if "INVALID_ARG" in code or message.startswith(backend.INPUT_ERROR_PREFIX):
            raise InputError(f"{model}: {message.removeprefix(backend.INPUT_ERROR_PREFIX)}")
        if "UNAVAILABLE" in code or any(marker in message for marker in _UNAVAILABLE):
            raise StageUnavailable(f"{model}: {message}")
        raise StageError(f"{model}: {message}")


class RemoteComponents:
    """Stages served by the ``clip``, ``llm``, ``mapper``, ``retrieval`` and ``diffusion`` models."""

    def __init__(self, checkpoint: str | Path) -> None:
        checkpoint = Path(checkpoint)
        args = GILLArgs.load(checkpoint)
        self.tokenizer, self.tokens = load_tokenizer(
            resolve_source(args.tokenizer or args.opt_version, checkpoint), args.num_tokens)
        # The retrieval model answers no hits when it has no corpus, and the turn generates instead.
        self.can_retrieve = True
        self.can_generate = True

    @staticmethod
    def _infer(model: str, inputs: list, outputs: list[str]):
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs).exec()
        _check(response, model)
        return response

    @staticmethod
    def _cancel(model: str, request_id: str) -> None:
        control = [backend.bytes_tensor("CANCEL", [request_id.encode()])]
        request = pb_utils.InferenceRequest(model_name=model, inputs=control, requested_output_names=[])
        for _ in request.exec(decoupled=True):
            pass

    def _stream(self, model: str, inputs: list, outputs: list[str], cancel: Callable[[], bool] | None) -> Iterator:
        """Responses of a decoupled model; when ``cancel()`` turns true, or the caller stops reading, the model
        is told to stop (and its remaining responses are drained)."""
        request_id = f"{model}-{uuid.uuid4().hex}"
        responses = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs,
                                              request_id=request_id).exec(decoupled=True)
        finished = cancelled = False
        try:
            for response in responses:
                # An error is the model's last word: Triton delivers nothing after it, so draining would hang.
                finished = response.has_error()
                _check(response, model)
                if response.output_tensors():
                    yield response
                if not cancelled and cancel is not None and cancel():
                    cancelled = True
                    self._cancel(model, request_id)
                    break
            else:
                finished = True
        finally:
            if not finished:
                if not cancelled:
                    self._cancel(model, request_id)
                for _ in responses:  # let the stream close cleanly
                    pass

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        prefixes, vectors = [], []
        for start in range(0, len(images), CLIP_MAX_BATCH):
            rows = [[png_bytes(image)] for image in images[start:start + CLIP_MAX_BATCH]]
            response = self._infer("clip", [pb_utils.Tensor("IMAGE", np.array(rows, dtype=np.object_))],
                                   ["PREFIX", "RETRIEVAL_VECTOR"])
            prefixes.append(_tensor_output(response, "PREFIX"))
            vectors.append(_tensor_output(response, "RETRIEVAL_VECTOR"))
        return torch.cat(prefixes), torch.cat(vectors)

    def decode(self, prompt: Prompt, options: GenerationOptions,
               cancel: CancelCheck | None) -> Iterator[TokenStep | ImageStates]:
        inputs = [backend.tensor("INPUT_IDS", prompt.ids.to(torch.int64)),
                  backend.bytes_tensor("OPTIONS", [json.dumps(options.to_dict()).encode()])]
        if prompt.prefixes is not None:
            inputs.append(backend.tensor("VISUAL_PREFIX", prompt.prefixes))
        for response in self._stream("llm", inputs, ["TOKENS", "FINISH_REASON", "IMG_STATES"], cancel):
            if pb_utils.get_output_tensor_by_name(response, "IMG_STATES") is not None:
                yield ImageStates({0: _tensor_output(response, "IMG_STATES")[0]})
                continue
            tokens = [int(token) for token in _output(response, "TOKENS")]
            reason = _output(response, "FINISH_REASON")[0].decode() or None
            if not tokens:  # a finish (for example a cancel) with no new token
                yield TokenStep([None], [reason])
            for position, token in enumerate(tokens):
                yield TokenStep([token], [reason if position == len(tokens) - 1 else None])

    def _mapper(self, states: torch.Tensor, outputs: list[str]):
        return self._infer("mapper", [backend.tensor("IMG_STATES", states)], outputs)

    def image_heads(self, states: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        response = self._mapper(states, ["RETRIEVAL_VECTOR", "DECISION_PROBS"])
        probabilities = torch.from_numpy(_output(response, "DECISION_PROBS").copy())
        if math.isnan(float(probabilities[0, 0])):  # no decision head in this checkpoint
            decision = Decision(["gen"] * probabilities.shape[0], None)
        else:
            decision = Decision(["gen" if p[0] >= p[1] else "ret" for p in probabilities.tolist()], probabilities)
        return _tensor_output(response, "RETRIEVAL_VECTOR"), decision

    def prompt_embeddings(self, states: torch.Tensor) -> torch.Tensor:
        return _tensor_output(self._mapper(states, ["PROMPT_EMBEDS"]), "PROMPT_EMBEDS")

    def retrieve(self, query: torch.Tensor, exclude: frozenset[int]) -> tuple[Hit, Image.Image] | None:
        try:
            response = self._infer(
                "retrieval",
                [backend.tensor("QUERY", query.reshape(-1)),
                 backend.tensor("TOP_K", np.array([RETRIEVAL_CANDIDATES], dtype=np.int32)),
                 backend.tensor("EXCLUDE", np.array(sorted(exclude), dtype=np.int64))],
                ["IDS", "SCORES", "URLS", "CAPTIONS", "IMAGES", "FAILURE"])
        except StageError as error:
            # A retrieval model being reloaded is a retrieval outage: the turn generates instead.
            if "RetrievalUnavailable" in str(error) or isinstance(error, StageUnavailable):
                raise RetrievalUnavailable(str(error)) from None
            raise
        rows = zip(_output(response, "IDS"), _output(response, "SCORES"), _output(response, "URLS"),
                   _output(response, "CAPTIONS"), _output(response, "IMAGES"), strict=True)
        for hit_id, score, url, caption, data in rows:
            if data:
                hit = Hit(int(hit_id), url.decode(), float(score), caption.decode() or None)
                return hit, load_image(bytes(data), what=hit.url)
        failure = _output(response, "FAILURE")
        if failure is not None and bytes(failure.reshape(-1)[0]):
            raise RetrievalFailed(bytes(failure.reshape(-1)[0]).decode())
        return None

    def generate(self, prompt_embeds: torch.Tensor, options: GenerationOptions, cancel: Callable[[], bool],
                 on_preview: PreviewCallback) -> Image.Image | None:
        inputs = [
            backend.tensor("PROMPT_EMBEDS", prompt_embeds.reshape(1, *prompt_embeds.shape[-2:])),
            backend.tensor("GUIDANCE_SCALE", np.array([options.guidance_scale], dtype=np.float32)),
            backend.tensor("STEPS", np.array([options.num_inference_steps], dtype=np.int32)),
            backend.tensor("SEED", np.array([-1 if options.seed is None else options.seed], dtype=np.int64)),
            backend.tensor("PREVIEW_EVERY", np.array([options.preview_every], dtype=np.int32)),
            backend.bytes_tensor("SCHEDULER", [options.scheduler.encode()]),
            # A response every step, so the cancellation check below runs every step.
            backend.tensor("PROGRESS", np.array([True])),
        ]
        image = None
        # Read to the end of the stream (the final flag follows the IMAGE response): leaving the loop at the image
        # would count as abandoning the request, and _stream would send diffusion a CANCEL for every image.
        for response in self._stream("diffusion", inputs, ["IMAGE", "PREVIEW", "STEP", "TOTAL_STEPS"], cancel):
            data = _output(response, "IMAGE")
            if data is not None:
                image = load_image(bytes(data[0]), what="generated image")
                continue
            preview = _output(response, "PREVIEW")
            if preview is not None:
                step, total = int(_output(response, "STEP")[0]), int(_output(response, "TOTAL_STEPS")[0])
                on_preview(step, total, load_image(bytes(preview[0]), what="preview"))
        return image
