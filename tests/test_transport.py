"""The orchestrator's gRPC transport (gill/serving/transport.py) against an in-process gRPC server that speaks
Triton's inference service: wire encoding, error mapping, per-call cancellation, the API key; and the parameters
the launcher gives the ``gill`` model. The served tests run it against the real Triton."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gill.errors import InputError
from gill.serving.server import TritonServer, _environment, free_port, prepare_repository
from gill.serving.transport import (
    API_KEY_HEADER,
    GrpcOutputs,
    GrpcTransport,
    StageError,
    StageUnavailable,
    encode,
    infer_request,
    stage_error,
)

INPUTS = {
    "STATES": torch.arange(6, dtype=torch.float64).reshape(1, 2, 3) / 7,  # a float64 tensor travels as FP32
    "IDS": np.array([5, -1, 2**40], dtype=np.int64),
    "FLAG": np.array([True]),
    "IMAGES": np.array([[b"\x89PNG\x00"], [b""]], dtype=np.object_),
    "EMPTY": np.array([], dtype=np.int64),
}


def _echo(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    """A response whose outputs are the request's inputs, byte for byte."""
    response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(raw)
    return response


def test_tensors_cross_the_wire_unchanged():
    request = infer_request("m", INPUTS, ["STATES", "IDS"], "id-1")
    assert [t.datatype for t in request.inputs] == ["FP32", "INT64", "BOOL", "BYTES", "INT64"]
    assert [list(t.shape) for t in request.inputs] == [[1, 2, 3], [3], [1], [2, 1], [0]]
    assert [o.name for o in request.outputs] == ["STATES", "IDS"] and request.id == "id-1"
    # BYTES: a 4-byte little-endian length before each element.
    assert encode("X", INPUTS["IMAGES"])[1] == b"\x05\x00\x00\x00\x89PNG\x00\x00\x00\x00\x00"
    outputs = GrpcOutputs(_echo(request))
    states = outputs.tensor("STATES")
    assert states.dtype == torch.float32 and torch.equal(states, INPUTS["STATES"].float())
    states += 1  # writable: a copy, not a view of the message
    np.testing.assert_array_equal(outputs.array("IDS"), INPUTS["IDS"])
    assert outputs.array("FLAG").tolist() == [True]
    assert outputs.array("IMAGES").tolist() == [[b"\x89PNG\x00"], [b""]]
    assert outputs.array("EMPTY").shape == (0,)
    assert outputs.has("IDS") and not outputs.has("NOPE") and outputs.array("NOPE") is None


@pytest.mark.parametrize(("message", "code", "kind"), [
    ("InputError: context too long", "", InputError),  # the prefix gill.serving.backend gives bad input
    ("bad shape", "INVALID_ARGUMENT", InputError),
    ("Stub process 'mapper_0_0' is not healthy.", "INTERNAL", StageUnavailable),
    ("Request for unknown model: 'llm' is not found", "", StageUnavailable),
    ("failed to connect to all addresses", "UNAVAILABLE", StageUnavailable),
    ("This protocol is restricted, expecting header 'triton-grpc-protocol-x-api-key'", "UNAVAILABLE", StageError),
    ("RuntimeError: boom", "INTERNAL", StageError),
])
def test_sub_model_errors_map_to_the_stage_errors(message, code, kind):
    error = stage_error("llm", message, code)
    assert type(error) is kind and str(error).startswith("llm: ") and "InputError" not in str(error)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's inference service, as much as the transport uses: ModelInfer echoes its inputs (or fails as the
    model ``fail-<CODE>`` asks); ModelStreamInfer sends responses every 10 ms until 100 are sent, the call is
    cancelled or a ``CANCEL`` control request names it, and records the calls' ends."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.stream_ends: list[str] = []
        self.cancelled: set[str] = set()
        self.ended = threading.Event()

    def ModelInfer(self, request, context):  # noqa: N802 - the service's method name
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model_name.startswith("fail-"):
            context.abort(getattr(grpc.StatusCode, request.model_name.removeprefix("fail-")), "no, because")
        return _echo(request)

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        request = next(request_iterator)
        if request.model_name == "bad-input":
            yield service_pb2.ModelStreamInferResponse(error_message="InputError: TOKENS too long")
            return
        if [tensor.name for tensor in request.inputs] == ["CANCEL"]:  # a control request: flag the id, then end
            self.cancelled.add(request.raw_input_contents[0][4:].decode())
            return
        try:
            for step in range(100):
                if not context.is_active() or request.id in self.cancelled:
                    break
                response = _echo(request)
                response.outputs.add(name="STEP", datatype="INT32", shape=[1])
                response.raw_output_contents.append(np.array([step], dtype=np.int32).tobytes())
                yield service_pb2.ModelStreamInferResponse(infer_response=response)
                time.sleep(0.01)
        finally:
            self.stream_ends.append("call cancelled" if not context.is_active()
                                    else "stopped by CANCEL" if request.id in self.cancelled else "finished")
            self.ended.set()


@pytest.fixture
def fake():
    servicer = FakeTriton()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    transport = GrpcTransport(f"127.0.0.1:{port}", api_key="key-0123456789abcdef")
    yield servicer, transport
    transport.close()
    server.stop(0)


def test_infer_sends_the_api_key_and_maps_status_codes(fake):
    servicer, transport = fake
    assert transport.infer("echo", {"IDS": INPUTS["IDS"]}, ["IDS"]).array("IDS").tolist() == INPUTS["IDS"].tolist()
    assert servicer.metadata[-1][API_KEY_HEADER] == "key-0123456789abcdef"
    with pytest.raises(InputError, match="fail-INVALID_ARGUMENT: no, because"):
        transport.infer("fail-INVALID_ARGUMENT", {}, [])
    with pytest.raises(StageUnavailable, match="fail-UNAVAILABLE"):
        transport.infer("fail-UNAVAILABLE", {}, [])
    with pytest.raises(StageError) as raised:
        transport.infer("fail-INTERNAL", {}, [])
    assert type(raised.value) is StageError


def test_a_server_that_cannot_be_reached_is_unavailable():
    transport = GrpcTransport(f"127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(StageUnavailable):
        transport.infer("mapper", {}, [])
    with pytest.raises(StageUnavailable):
        list(transport.stream("llm", {}, [], None))


def test_a_stream_runs_to_its_end_and_a_bad_input_error_ends_it(fake):
    servicer, transport = fake
    steps = [int(r.array("STEP")[0]) for r in transport.stream("echo", {"IDS": INPUTS["IDS"]}, ["IDS"], None)]
    assert steps == list(range(100))
    assert servicer.ended.wait(5) and servicer.stream_ends == ["finished"]
    with pytest.raises(InputError, match="bad-input: TOKENS too long"):
        list(transport.stream("bad-input", {}, [], None))


@pytest.mark.parametrize("how", ["cancel check", "caller stops reading"])
def test_a_cancelled_stream_is_stopped_by_a_cancel_request_not_by_cancelling_the_call(fake, how):
    # Triton 2.51's gRPC front end can crash when a call's cancellation races its last response (server PR 7840).
    servicer, transport = fake
    seen = []
    stream = transport.stream("echo", {}, [], cancel=lambda: len(seen) >= 3 if how == "cancel check" else False)
    for response in stream:
        seen.append(int(response.array("STEP")[0]))
        if how == "caller stops reading" and len(seen) == 3:
            stream.close()
            break
    assert seen == [0, 1, 2]
    assert servicer.ended.wait(5) and servicer.stream_ends == ["stopped by CANCEL"]


def test_the_launcher_points_the_gill_model_at_its_own_grpc_port(tiny_dir, tmp_path):
    server = TritonServer(tiny_dir, host="0.0.0.0", grpc_port=18001, work_dir=tmp_path / "work",
                          parameters={"llm": {"max_batch": "2"}})
    assert server.model_parameters() == {"gill": {"grpc_url": "127.0.0.1:18001", "grpc_root_cert": ""},
                                         "llm": {"max_batch": "2"}}
    chosen = TritonServer(tiny_dir, grpc_port=18001, parameters={"gill": {"transport": "bls"}}).model_parameters()
    assert chosen["gill"]["transport"] == "bls", "the caller's parameters win"
    models = prepare_repository(tmp_path / "models", tiny_dir, ("gill",), parameters=server.model_parameters())
    config = (models / "gill" / "config.pbtxt").read_text()
    assert 'key: "grpc_url" value: { string_value: "127.0.0.1:18001" }' in config
    # The key reaches the stubs through the environment, never a stale one from the caller's shell.
    assert _environment("key-0123456789abcdef")["GILL_API_KEY"] == "key-0123456789abcdef"
    assert "GILL_API_KEY" not in _environment(None)
