"""How the ``gill`` orchestrator reaches the other models: the errors every transport raises, and the gRPC one.

:class:`~gill.serving.remote.RemoteComponents` holds the stage logic (what to send to ``clip``, ``llm``,
``mapper``, ``retrieval`` and ``diffusion`` and how to read their answers); a transport only carries named
tensors there and back. Two exist:

- ``bls`` (:class:`gill.serving.remote.BlsTransport`): Triton's Python-backend BLS calls, inside the server.
- ``grpc`` (:class:`GrpcTransport`, here): Triton's own gRPC endpoint on loopback, as any client calls it. It
  exists because Triton 2.51's backend stub builds the numpy arrays of BLS responses on its IPC thread without
  holding the GIL, which corrupts the orchestrator's heap under concurrent turns (docs/reliability.md); over
  gRPC the orchestrator's stub handles no BLS response at all. The cost: tensors cross as bytes through host
  memory (BLS hands a GPU tensor over without a copy), and each call goes through the server's gRPC front end.

This module does not need Triton's Python backend (the stage errors are also raised by the BLS transport).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

from gill.errors import GillError, InputError

# Where a bad-input error's message starts (gill.serving.backend.error_response): Triton 2.51's BLS passes every
# sub-model error on as INTERNAL, and a streamed gRPC error carries no code at all, so the prefix is what tells.
INPUT_ERROR_PREFIX = "InputError: "
# How Triton words "this model cannot take requests now" (a dead stub, an unloaded or loading model).
_UNAVAILABLE = ("is not healthy", "is not ready", "is not found", "unknown model")
# Triton's restricted-protocol header for the key `gill serve --api-key` sets (Triton prefixes gRPC keys).
API_KEY_HEADER = "triton-grpc-protocol-x-api-key"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # images and [IMG] states fit easily; the default 4 MiB would not

Value = np.ndarray | torch.Tensor
Inputs = Mapping[str, Value]


class StageError(GillError):
    """A downstream model answered with an error."""


class StageUnavailable(StageError):
    """A downstream model cannot serve right now: its stub process died (the watchdog is reloading it) or it
    is not loaded. Transient: the client may retry the turn."""


def stage_error(model: str, message: str, code: str = "") -> GillError:
    """The error to raise for ``model``'s error ``message`` (``code``: Triton's or gRPC's status name, when the
    transport has one): InputError for bad input, StageUnavailable for a model that cannot serve now (and for
    a server that cannot be reached), StageError otherwise."""
    if "INVALID_ARG" in code or message.startswith(INPUT_ERROR_PREFIX):
        return InputError(f"{model}: {message.removeprefix(INPUT_ERROR_PREFIX)}")
    if "restricted" in message:  # a missing or wrong API key: a setup error, retrying will not help
        return StageError(f"{model}: {message}")
    if "UNAVAILABLE" in code or any(marker in message for marker in _UNAVAILABLE):
        return StageUnavailable(f"{model}: {message}")
    return StageError(f"{model}: {message}")


class Outputs(Protocol):
    """One response's output tensors."""

    def has(self, name: str) -> bool:
        """Whether the response carries output ``name``."""

    def array(self, name: str) -> np.ndarray | None:
        """Output ``name`` as numpy on the host, or None when the response does not carry it."""

    def tensor(self, name: str) -> torch.Tensor:
        """Float output ``name`` as torch (on a GPU where the transport can leave it there)."""


class Transport(Protocol):
    """Carries named tensors to a model and its answers back; raises the errors of :func:`stage_error`."""

    def infer(self, model: str, inputs: Inputs, outputs: list[str]) -> Outputs:
        """One request to a model that answers once."""

    def stream(self, model: str, inputs: Inputs, outputs: list[str],
               cancel: Callable[[], bool] | None) -> Iterator[Outputs]:
        """The responses (those with outputs) of one request to a decoupled model. Once ``cancel()`` turns true
        (asked after each response), or the caller stops reading, the model is told to stop."""

    def close(self) -> None:
        """Release what the transport holds (the ``gill`` model calls it when it is unloaded)."""


def host_array(value: Value) -> np.ndarray:
    """``value`` as a C-contiguous host array: a floating torch tensor becomes float32, the TYPE_FP32 of every
    config (as :func:`gill.serving.backend.tensor` sends it)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        value = value.cpu().numpy()
    return np.ascontiguousarray(value)


def encode(name: str, value: Value) -> tuple[service_pb2.ModelInferRequest.InferInputTensor, bytes]:
    """One input tensor of a ``ModelInferRequest`` and its raw contents (Triton's wire form: numbers
    little-endian, BYTES as 4-byte little-endian lengths each followed by the bytes)."""
    array = host_array(value)
    if array.dtype == np.object_:
        raw = serialize_byte_tensor(array).item() if array.size else b""
        datatype = "BYTES"
    else:
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        datatype = np_to_triton_dtype(array.dtype)
    return service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape), raw


def infer_request(model: str, inputs: Inputs, outputs: list[str],
                  request_id: str = "") -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` of ``inputs`` asking for ``outputs``."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs.items():
        tensor, raw = encode(name, value)
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


class GrpcOutputs:
    """The outputs of one ``ModelInferResponse``."""

    def __init__(self, response: service_pb2.ModelInferResponse) -> None:
        self._outputs = {output.name: (output, raw) for output, raw in
                         zip(response.outputs, response.raw_output_contents, strict=True)}

    def __bool__(self) -> bool:
        return bool(self._outputs)

    def has(self, name: str) -> bool:
        return name in self._outputs

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._outputs:
            return None
        output, raw = self._outputs[name]
        shape = tuple(output.shape)
        if output.datatype == "BYTES":
            values = deserialize_bytes_tensor(raw) if raw else np.array([], dtype=np.object_)
            return values.reshape(shape)
        return np.frombuffer(raw, dtype=np.dtype(triton_to_np_dtype(output.datatype)).newbyteorder("<")).reshape(shape)

    def tensor(self, name: str) -> torch.Tensor:
        array = self.array(name)
        if array is None:
            raise StageError(f"the response has no output {name}")
        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


class GrpcTransport:
    """Triton's gRPC endpoint at ``url`` (``host:port``; the server's own, on loopback). Requests to decoupled
    models are one ``ModelStreamInfer`` call each, stopped (when the turn is cancelled or stops reading) by a
    ``CANCEL`` control request naming its id, as over BLS, never by cancelling the call. ``api_key``:
    the server's key (``gill serve --api-key``); ``root_certificates``: a PEM file to trust when the endpoint is
    TLS (the server's own certificate, which must then be valid for the host of ``url``)."""

    def __init__(self, url: str, api_key: str | None = None, root_certificates: str | Path | None = None) -> None:
        if not url or ":" not in url:
            raise ValueError(f"grpc_url {url!r}: expected host:port of this server's gRPC endpoint")
        options = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
        if root_certificates:
            credentials = grpc.ssl_channel_credentials(Path(root_certificates).read_bytes())
            self._channel = grpc.secure_channel(url, credentials, options)
        else:
            self._channel = grpc.insecure_channel(url, options)
        self.url = url
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else ()

    def close(self) -> None:
        self._channel.close()

    def infer(self, model: str, inputs: Inputs, outputs: list[str]) -> GrpcOutputs:
        try:
            response = self._stub.ModelInfer(infer_request(model, inputs, outputs), metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._rpc_error(model, error) from None
        return GrpcOutputs(response)

    def stream(self, model: str, inputs: Inputs, outputs: list[str],
               cancel: Callable[[], bool] | None) -> Iterator[GrpcOutputs]:
        request_id = f"{model}-{uuid.uuid4().hex}"
        # One request, then the client half of the stream closes: Triton ends the call after the final response.
        call = self._stub.ModelStreamInfer(iter((infer_request(model, inputs, outputs, request_id),)),
                                           metadata=self._metadata)
        finished = False
        try:
            for message in call:
                if message.error_message:  # in-band, without a code; the model's last word
                    finished = True
                    raise stage_error(model, message.error_message)
                response = GrpcOutputs(message.infer_response)
                if response:
                    yield response
                if cancel is not None and cancel():
                    break
            else:
                finished = True
        except grpc.RpcError as error:
            finished = True
            raise self._rpc_error(model, error) from None
        finally:
            if not finished:
                # Never cancel the call itself: Triton 2.51's gRPC front end can crash when a cancellation races
                # the request's last response (fixed in 2.53, server PR 7840). Ask the model to stop, as BLS
                # does, and read the call to its end.
                self._cancel(model, request_id)
                for _ in call:
                    pass

    def _cancel(self, model: str, request_id: str) -> None:
        """A ``CANCEL`` control request for ``request_id`` (gill.serving.backend.handle_control), read to its end."""
        control = infer_request(model, {"CANCEL": np.array([request_id.encode()], dtype=np.object_)}, [])
        try:
            for _ in self._stub.ModelStreamInfer(iter((control,)), metadata=self._metadata):
                pass
        except grpc.RpcError:
            pass  # the model is gone: nothing left to stop

    def _rpc_error(self, model: str, error: grpc.RpcError) -> GillError:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
        # The details as Triton words them (a refused connection names the address): a bad-input message must
        # reach the client unchanged.
        return stage_error(model, details, code.name if code else "")
