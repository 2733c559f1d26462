"""Helpers of the serving tests: build raw gill.v1 requests and read a turn's raw events off a real server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc

from gill.limits import Limits
from gill_client import _transport as transport
from gill_client.v1 import dialogue_pb2 as pb

PROMPT_GEN, PROMPT_RET = "draw a red circle", "find a photo of a cat"
API_KEY = "test-key-0123456789abcdef"  # the session server requires it (gill serve --api-key)
# The session server's limits: the defaults but a 4 MiB request, so an oversized request stays cheap to send.
SERVED_LIMITS = Limits(max_request_bytes=4 * 1024 * 1024)


def request(*messages, **options) -> pb.ChatRequest:
    chat = pb.ChatRequest()
    for role, parts in messages:
        message = chat.messages.add(role=role)
        for part in parts:
            if isinstance(part, str):
                message.parts.add(text=part)
            else:
                message.parts.add(image=pb.Image(data=part, mime_type="image/png"))
    for key, value in options.items():
        setattr(chat.options, key, value)
    return chat


def user(*parts):
    return (pb.ROLE_USER, parts)


def assistant(*parts):
    return (pb.ROLE_ASSISTANT, parts)


def headers(api_key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    return ((transport.API_KEY_HEADER, api_key),)


def open_turn(server, chat: pb.ChatRequest, timeout: float = 120.0):
    """The raw ModelStreamInfer call of one turn: iterate it for responses, ``cancel()`` it."""
    channel = grpc.insecure_channel(server.endpoints.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelStreamInfer(iter([transport.infer_request("gill", chat)]), metadata=headers(), timeout=timeout)


def events(server, chat: pb.ChatRequest) -> list[pb.ChatEvent]:
    """Every ChatEvent of one turn, raw, until the stream ends."""
    out = []
    for response in open_turn(server, chat):
        message, _ = transport.chat_event(response, chat.request_id)
        if message is not None:
            out.append(message)
    return out


def stream_results(server, model: str, inputs: list, timeout: float = 120.0) -> list:
    """(result, error) pairs of one raw streaming call, once the stream has ended; a stream still open after
    ``timeout`` seconds ends with a DEADLINE_EXCEEDED error instead of hanging the test."""
    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    results = []
    client.start_stream(callback=lambda result, error: results.append((result, error)), stream_timeout=timeout,
                        headers={transport.API_KEY_HEADER: API_KEY})
    client.async_stream_infer(model, inputs)
    client.stop_stream()
    client.close()
    return results


def bytes_input(name: str, data: bytes):
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def raw_events(server, data: bytes) -> list[pb.ChatEvent]:
    """Every ChatEvent of one turn whose REQUEST tensor holds ``data`` as it is (any bytes, not only a valid
    ChatRequest); Triton-level errors fail the test (a bad request must be answered by the model)."""
    out = []
    for result, error in stream_results(server, "gill", [bytes_input("REQUEST", data)]):
        assert error is None, error
        output = result.as_numpy("EVENT")
        if output is not None:
            out.append(pb.ChatEvent.FromString(bytes(output.reshape(-1)[0])))
    return out


def kinds(stream) -> list[str]:
    return [event.WhichOneof("event") for event in stream]


def metric(server, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples (with these labels) on the server's metrics port."""
    text = requests.get(server.endpoints.metrics, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway PEM certificate for localhost and 127.0.0.1 and its key, made with the openssl command."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key
