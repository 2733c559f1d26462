"""The orchestrator's :class:`~gill.components.Components`: each stage is a call to another Triton model.

Imported only inside Triton's Python backend. The stage logic lives in :class:`RemoteComponents`; how a call
travels is a :class:`~gill.serving.transport.Transport`, chosen by the ``gill`` model's ``transport`` parameter:
``bls`` (:class:`BlsTransport`, Triton's in-server BLS calls) or ``grpc`` (the server's own gRPC endpoint on
loopback, :class:`~gill.serving.transport.GrpcTransport`).
"""

from __future__ import annotations

import json
import math
import os
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
from gill.errors import ConfigError
from gill.images import load_image, png_bytes
from gill.model import Decision
from gill.options import GenerationOptions
from gill.retrieval import RETRIEVAL_CANDIDATES, Hit, RetrievalFailed, RetrievalUnavailable
from gill.serving import backend
from gill.serving.server import API_KEY_ENV
from gill.serving.transport import (  # noqa: F401  (StageError, StageUnavailable: the errors this module raises)
    GrpcTransport,
    Inputs,
    Outputs,
    StageError,
    StageUnavailable,
    Transport,
    stage_error,
)
from gill.tokens import load_tokenizer

CLIP_MAX_BATCH = 8  # model_repository/clip/config.pbtxt max_batch_size
TRANSPORTS = ("bls", "grpc")


class BlsOutputs:
    """The outputs of one BLS response."""

    def __init__(self, response) -> None:
        self._response = response

    def has(self, name: str) -> bool:
        return pb_utils.get_output_tensor_by_name(self._response, name) is not None

    def array(self, name: str) -> np.ndarray | None:
        """Output ``name`` as numpy (copied off the GPU if the model produced it there: ``as_numpy`` cannot)."""
        tensor = pb_utils.get_output_tensor_by_name(self._response, name)
        if tensor is None:
            return None
        return tensor.as_numpy() if tensor.is_cpu() else backend.to_torch(tensor).cpu().numpy()

    def tensor(self, name: str) -> torch.Tensor:
        """Float output ``name`` as torch, where the model left it: a CUDA tensor stays on its GPU (DLPack, no
        copy), so the [IMG] states and prompt embeddings go llm -> mapper -> diffusion without a trip through host
        memory."""
        return backend.to_torch(pb_utils.get_output_tensor_by_name(self._response, name))


def _check(response, model: str) -> None:
    if response.has_error():
        # Triton 2.51's BLS hands every error over as INTERNAL (the code is lost, the message kept), so bad input
        # is also known by the prefix backend.error_response gives it.
        raise stage_error(model, response.error().message(), str(response.error().code()))


def _bls_inputs(inputs: Inputs) -> list:
    return [backend.tensor(name, value) for name, value in inputs.items()]


class BlsTransport:
    """Calls through Triton's BLS (``pb_utils.InferenceRequest(...).exec()``), inside the server. Sub-requests to
    decoupled models get their own ids so that a ``CANCEL`` control request can stop the ``llm`` or
    ``diffusion`` work behind them: the response iterator of Triton 2.51 has no ``cancel()``, and leaving its
    loop would let the model run on."""

    def close(self) -> None:
        pass  # BLS calls hold nothing between requests

    def infer(self, model: str, inputs: Inputs, outputs: list[str]) -> BlsOutputs:
        response = pb_utils.InferenceRequest(model_name=model, inputs=_bls_inputs(inputs),
                                             requested_output_names=outputs).exec()
        _check(response, model)
        return BlsOutputs(response)

    @staticmethod
    def _cancel(model: str, request_id: str) -> None:
        control = [backend.bytes_tensor("CANCEL", [request_id.encode()])]
        request = pb_utils.InferenceRequest(model_name=model, inputs=control, requested_output_names=[])
        for _ in request.exec(decoupled=True):
            pass

    def stream(self, model: str, inputs: Inputs, outputs: list[str],
               cancel: Callable[[], bool] | None) -> Iterator[BlsOutputs]:
        request_id = f"{model}-{uuid.uuid4().hex}"
        responses = pb_utils.InferenceRequest(model_name=model, inputs=_bls_inputs(inputs),
                                              requested_output_names=outputs,
                                              request_id=request_id).exec(decoupled=True)
        finished = cancelled = False
        try:
            for response in responses:
                # An error is the model's last word: Triton delivers nothing after it, so draining would hang.
                finished = response.has_error()
                _check(response, model)
                if response.output_tensors():
                    yield BlsOutputs(response)
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


def transport_from_parameters(params: dict[str, str]) -> Transport:
    """The transport the ``gill`` model's parameters choose: ``transport`` (``bls`` or ``grpc``; empty: ``grpc``
    when ``grpc_url`` is set, as `gill serve` sets it, else ``bls``), and for ``grpc`` the endpoint ``grpc_url``
    and, when that endpoint is TLS, ``grpc_root_cert`` (`gill serve` sets both); the API key comes from the
    environment variable ``GILL_API_KEY``."""
    name = params.get("transport") or ("grpc" if params.get("grpc_url") else "bls")
    if name == "bls":
        return BlsTransport()
    if name != "grpc":
        raise ConfigError(f"gill parameter transport={name!r} (allowed: {', '.join(TRANSPORTS)})")
    url = params.get("grpc_url", "")
    if not url:
        raise ConfigError("gill parameter transport='grpc' needs grpc_url, the host:port of this server's gRPC "
                          "endpoint (gill serve sets it)")
    return GrpcTransport(url, os.environ.get(API_KEY_ENV) or None, params.get("grpc_root_cert") or None)


class RemoteComponents:
    """Stages served by the ``clip``, ``llm``, ``mapper``, ``retrieval`` and ``diffusion`` models, reached
    through ``transport``."""

    def __init__(self, checkpoint: str | Path, transport: Transport) -> None:
        checkpoint = Path(checkpoint)
        args = GILLArgs.load(checkpoint)
        self.tokenizer, self.tokens = load_tokenizer(
            resolve_source(args.tokenizer or args.opt_version, checkpoint), args.num_tokens)
        self.transport = transport
        # The retrieval model answers no hits when it has no corpus, and the turn generates instead.
        self.can_retrieve = True
        self.can_generate = True

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        prefixes, vectors = [], []
        for start in range(0, len(images), CLIP_MAX_BATCH):
            rows = [[png_bytes(image)] for image in images[start:start + CLIP_MAX_BATCH]]
            response = self.transport.infer("clip", {"IMAGE": np.array(rows, dtype=np.object_)},
                                            ["PREFIX", "RETRIEVAL_VECTOR"])
            prefixes.append(response.tensor("PREFIX"))
            vectors.append(response.tensor("RETRIEVAL_VECTOR"))
        return torch.cat(prefixes), torch.cat(vectors)

    def decode(self, prompt: Prompt, options: GenerationOptions,
               cancel: CancelCheck | None) -> Iterator[TokenStep | ImageStates]:
        inputs: dict = {"INPUT_IDS": prompt.ids.to(torch.int64),
                        "OPTIONS": _strings(json.dumps(options.to_dict()))}
        if prompt.prefixes is not None:
            inputs["VISUAL_PREFIX"] = prompt.prefixes
        for response in self.transport.stream("llm", inputs, ["TOKENS", "FINISH_REASON", "IMG_STATES"], cancel):
            if response.has("IMG_STATES"):
                yield ImageStates({0: response.tensor("IMG_STATES")[0]})
                continue
            tokens = [int(token) for token in response.array("TOKENS")]
            reason = response.array("FINISH_REASON")[0].decode() or None
            if not tokens:  # a finish (for example a cancel) with no new token
                yield TokenStep([None], [reason])
            for position, token in enumerate(tokens):
                yield TokenStep([token], [reason if position == len(tokens) - 1 else None])

    def _mapper(self, states: torch.Tensor, outputs: list[str]) -> Outputs:
        return self.transport.infer("mapper", {"IMG_STATES": states}, outputs)

    def image_heads(self, states: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        response = self._mapper(states, ["RETRIEVAL_VECTOR", "DECISION_PROBS"])
        probabilities = torch.from_numpy(response.array("DECISION_PROBS").copy())
        if math.isnan(float(probabilities[0, 0])):  # no decision head in this checkpoint
            decision = Decision(["gen"] * probabilities.shape[0], None)
        else:
            decision = Decision(["gen" if p[0] >= p[1] else "ret" for p in probabilities.tolist()], probabilities)
        return response.tensor("RETRIEVAL_VECTOR"), decision

    def prompt_embeddings(self, states: torch.Tensor) -> torch.Tensor:
        return self._mapper(states, ["PROMPT_EMBEDS"]).tensor("PROMPT_EMBEDS")

    def retrieve(self, query: torch.Tensor, exclude: frozenset[int]) -> tuple[Hit, Image.Image] | None:
        try:
            response = self.transport.infer(
                "retrieval",
                {"QUERY": query.reshape(-1),
                 "TOP_K": np.array([RETRIEVAL_CANDIDATES], dtype=np.int32),
                 "EXCLUDE": np.array(sorted(exclude), dtype=np.int64)},
                ["IDS", "SCORES", "URLS", "CAPTIONS", "IMAGES", "FAILURE"])
        except StageError as error:
            # A retrieval model being reloaded is a retrieval outage: the turn generates instead.
            if "RetrievalUnavailable" in str(error) or isinstance(error, StageUnavailable):
                raise RetrievalUnavailable(str(error)) from None
            raise
        rows = zip(response.array("IDS"), response.array("SCORES"), response.array("URLS"),
                   response.array("CAPTIONS"), response.array("IMAGES"), strict=True)
        for hit_id, score, url, caption, data in rows:
            if data:
                hit = Hit(int(hit_id), url.decode(), float(score), caption.decode() or None)
                return hit, load_image(bytes(data), what=hit.url)
        failure = response.array("FAILURE")
        if failure is not None and bytes(failure.reshape(-1)[0]):
            raise RetrievalFailed(bytes(failure.reshape(-1)[0]).decode())
        return None

    def generate(self, prompt_embeds: torch.Tensor, options: GenerationOptions, cancel: Callable[[], bool],
                 on_preview: PreviewCallback) -> Image.Image | None:
        inputs = {
            "PROMPT_EMBEDS": prompt_embeds.reshape(1, *prompt_embeds.shape[-2:]),
            "GUIDANCE_SCALE": np.array([options.guidance_scale], dtype=np.float32),
            "STEPS": np.array([options.num_inference_steps], dtype=np.int32),
            "SEED": np.array([-1 if options.seed is None else options.seed], dtype=np.int64),
            "PREVIEW_EVERY": np.array([options.preview_every], dtype=np.int32),
            "SCHEDULER": _strings(options.scheduler),
            # A response every step, so the cancellation check below runs every step.
            "PROGRESS": np.array([True]),
        }
        image = None
        # Read to the end of the stream (the final flag follows the IMAGE response): leaving the loop at the image
        # would abandon the request, and the transport would send a CANCEL control request for every image.
        for response in self.transport.stream("diffusion", inputs, ["IMAGE", "PREVIEW", "STEP", "TOTAL_STEPS"],
                                               cancel):
            data = response.array("IMAGE")
            if data is not None:
                image = load_image(bytes(data[0]), what="generated image")
                continue
            preview = response.array("PREVIEW")
            if preview is not None:
                step, total = int(response.array("STEP")[0]), int(response.array("TOTAL_STEPS")[0])
                on_preview(step, total, load_image(bytes(preview[0]), what="preview"))
        return image


def _strings(*values: str) -> np.ndarray:
    """A BYTES tensor of UTF-8 strings, shape [len(values)]."""
    return np.array([value.encode() for value in values], dtype=np.object_)
