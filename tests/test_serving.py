"""Integration tests: a real tritonserver on loopback, serving the tiny checkpoint, driven over gRPC."""

from __future__ import annotations

import io
import json
import re
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image
from wire import (
    PROMPT_GEN,
    PROMPT_RET,
    assistant,
    bytes_input,
    events,
    kinds,
    metric,
    open_turn,
    request,
    stream_results,
    user,
)

from gill import protocol
from gill.corpus import RetrievalSettings
from gill.images import png_bytes
from gill.pipeline import Pipeline
from gill.serving.server import ServeError, TritonServer, free_ports
from gill.tiny import shape_image
from gill_client import _transport as transport
from gill_client.v1 import dialogue_pb2 as pb


@pytest.fixture(scope="module")
def local(served_dir):
    """In-process, with the reference's exact retrieval: the server searches Milvus, so equal turns also show
    that Milvus retrieval ranks and scores as the reference does (and only one process may open the .db)."""
    return Pipeline.from_checkpoint(served_dir, device="cpu", retrieval=RetrievalSettings(retriever="exact"))


IMAGE = png_bytes(shape_image("green", "square", "white", 48))


def test_server_is_ready_with_every_model(server):
    for model in ("clip", "llm", "mapper", "retrieval", "diffusion", "tokenize", "gill", "text_to_image"):
        assert requests.get(f"{server.endpoints.http}/v2/models/{model}/ready", timeout=5).status_code == 200


def test_multi_turn_dialogue_with_an_image_streams_text_then_an_image(server):
    chat = request(user(IMAGE, "what is this?"), assistant("a green square."), user("show me another one"),
                   gen_scale_factor=1e5, min_word_tokens=4, num_inference_steps=3, seed=3)
    stream = events(server, chat)
    names = kinds(stream)
    assert names[-1] == "done"
    assert names.count("text") >= 3 and names.index("text") < names.index("image"), names
    image = next(e.image for e in stream if e.WhichOneof("event") == "image")
    assert image.png.startswith(b"\x89PNG")
    assert image.source in (pb.IMAGE_SOURCE_GENERATED, pb.IMAGE_SOURCE_RETRIEVED)
    done = stream[-1].done
    assert done.generated_tokens == 32 and done.prompt_tokens > 4
    assert done.text == "".join(e.text.text for e in stream if e.WhichOneof("event") == "text")


def test_retrieval_or_generation_follows_the_decision_head(server, local):
    for text, choice in ((PROMPT_GEN, "gen"), (PROMPT_RET, "ret")):
        chat = request(user(text), ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=2, seed=0)
        [expected] = local.run(protocol.parts_from_request(chat), protocol.options_from_request(chat)).images
        assert expected.decision == choice
        image = next(e.image for e in events(server, chat) if e.WhichOneof("event") == "image")
        assert image.decision == (pb.DECISION_GENERATE if choice == "gen" else pb.DECISION_RETRIEVE)
        assert image.source == (pb.IMAGE_SOURCE_GENERATED if choice == "gen" else pb.IMAGE_SOURCE_RETRIEVED)
        assert (image.p_generate > 0.99) == (choice == "gen")
        if choice == "ret":
            assert image.url == expected.url and image.caption == expected.caption
            assert image.score == pytest.approx(expected.score, abs=1e-4)


@pytest.mark.parametrize("options", [
    {"gen_scale_factor": 1e5, "min_word_tokens": 2, "num_inference_steps": 4, "seed": 11},
    {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_images": 0},
])
def test_served_turn_equals_the_in_process_turn(server, local, options):
    chat = request(user(IMAGE, "Q: what is in the picture?"), **options)
    served = events(server, chat)
    in_process = local.run(protocol.parts_from_request(chat), protocol.options_from_request(chat))
    assert served[-1].done.text == in_process.text
    assert served[-1].done.generated_tokens == in_process.done.generated_tokens
    served_images = [e.image for e in served if e.WhichOneof("event") == "image"]
    assert len(served_images) == len(in_process.images)
    for got, expected in zip(served_images, in_process.images):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.png))), np.asarray(expected.image))
        assert got.score == pytest.approx(expected.score, abs=1e-4)


def test_closing_the_stream_mid_diffusion_stops_denoising(server):
    steps_before = metric(server, "gill_denoising_steps_total")
    cancelled_before = metric(server, "gill_diffusion_requests_total", outcome="cancelled")
    chat = request(user(PROMPT_GEN), ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=200,
                   preview_every=1, seed=1)
    turn = open_turn(server, chat)
    previews = 0
    for response in turn:
        event, _ = transport.chat_event(response, "")
        if event is not None and event.WhichOneof("event") == "preview":
            previews += 1
            if previews == 2:
                turn.cancel()
                break
    deadline = time.monotonic() + 30
    while metric(server, "gill_diffusion_requests_total", outcome="cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the diffusion model never saw the cancellation"
        time.sleep(0.2)
    steps = metric(server, "gill_denoising_steps_total") - steps_before
    assert 2 <= steps < 200, f"{steps} denoising steps ran after a cancel at step 2"
    # The log says where it stopped, and the next request is served normally.
    assert re.search(r"diffusion .* cancelled after step \d+ of \d+", server.log_path.read_text())
    follow_up = events(server, request(user("hello"), max_new_tokens=3, max_images=0))
    assert kinds(follow_up)[-1] == "done"


def test_text_to_image_ensemble_returns_a_png(server):
    results = stream_results(server, "text_to_image", [bytes_input("TEXT", b"a red circle on a blue background")])
    assert [e for _, e in results if e is not None] == []
    images = [r.as_numpy("IMAGE") for r, _ in results if r.as_numpy("IMAGE") is not None]
    assert len(images) == 1 and bytes(images[0].reshape(-1)[0]).startswith(b"\x89PNG")


def test_custom_metrics_count_tokens_images_and_decisions(server):
    events(server, request(user("show me"), ret_scale_factor=1e5, max_new_tokens=2, num_inference_steps=2))
    assert metric(server, "gill_tokens_generated_total") >= 2
    assert metric(server, "gill_decisions_total") >= 1
    assert metric(server, "gill_images_total") >= 1
    assert metric(server, "gill_stage_seconds_total", stage="total") > 0


def test_a_model_that_fails_to_load_is_reported_not_hung(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "gill_adapters.safetensors").write_bytes(b"not safetensors")
    # Unverified, so that the model load itself fails (verification refuses it earlier: tests/test_integrity.py).
    server = TritonServer(broken, models=("mapper",), verify=False)
    started = time.monotonic()
    with pytest.raises(ServeError) as raised:
        server.start(timeout=120)
    assert time.monotonic() - started < 110
    assert "gill_adapters.safetensors" in str(raised.value)
    server.stop()


def test_a_server_gets_distinct_ports(tiny_dir, tmp_path):
    # Ports chosen one at a time could repeat, and Triton then refused to start ("cannot listen to GRPC requests
    # and metrics requests at the same address and port"): chosen together, they cannot.
    assert len(set(free_ports(100))) == 100
    for _ in range(20):
        endpoints = TritonServer(tiny_dir, work_dir=tmp_path).endpoints
        assert len({endpoints.grpc_port, endpoints.http_port, endpoints.metrics_port}) == 3


def test_model_configs_take_the_checkpoint_as_a_parameter(server, served_dir):
    for config in (server.work_dir / "models").glob("*/config.pbtxt"):
        text = config.read_text()
        if 'key: "checkpoint"' in text:
            assert json.dumps(str(served_dir.resolve())) in text
