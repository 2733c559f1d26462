"""Shared fixtures: one tiny checkpoint, one loaded pipeline and one Triton server per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from wire import API_KEY, PROMPT_GEN, PROMPT_RET, SERVED_LIMITS, request, user

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of tiny forwards and optimiser steps: a second thread on a busy 2-core runner mostly waits
    (measured 50x slower steps with two); use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gill.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("gill-tiny"), seed=0)


@pytest.fixture(scope="session")
def pipeline(tiny_dir: Path):
    from gill.pipeline import Pipeline

    return Pipeline.from_checkpoint(tiny_dir, device="cpu")


@pytest.fixture
def decision_bias(pipeline):
    """Force the decision head towards one class for a test, restoring it afterwards."""
    head = pipeline.components.model.decision_head
    saved = head[1].bias.detach().clone()

    def force(choice: str) -> None:
        with torch.no_grad():
            head[1].bias.copy_(torch.tensor([100.0, -100.0] if choice == "gen" else [-100.0, 100.0]))

    yield force
    with torch.no_grad():
        head[1].bias.copy_(saved)


@pytest.fixture(scope="session")
def served_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a decision head that generates for PROMPT_GEN and retrieves for PROMPT_RET, and
    its retrieval corpus ingested into ``retrieval.db`` (so the served ``retrieval`` model searches Milvus).

    A random head decides the same way for almost every prompt; this one separates two known [IMG0] states,
    so the tests can check that the served branch follows the head.
    """
    import shutil

    from safetensors.torch import save_file

    from gill import protocol
    from gill.events import ImageRequest
    from gill.pipeline import Pipeline

    directory = tmp_path_factory.mktemp("served") / "checkpoint"
    shutil.copytree(tiny_dir, directory)
    pipeline = Pipeline.from_checkpoint(directory, device="cpu", load_diffusion=False, load_retrieval=False)

    def img0_state(text):
        chat = request(user(text), ret_scale_factor=1e5, max_new_tokens=1)
        stream = pipeline.stream(protocol.parts_from_request(chat), protocol.options_from_request(chat))
        return next(e.hidden_states[0] for e in stream if isinstance(e, ImageRequest))

    generate, retrieve = img0_state(PROMPT_GEN), img0_state(PROMPT_RET)
    direction = (generate - retrieve) * 10 / (generate - retrieve).norm() ** 2  # margin of +-5 logits
    offset = -float(direction @ (generate + retrieve)) / 2
    save_file({"1.weight": torch.stack([direction, -direction]).contiguous(),
               "1.bias": torch.tensor([offset, -offset])}, directory / "decision_model.safetensors")
    from gill.milvus import DB_FILE, ingest, read_corpus

    ingest(read_corpus(directory / "cc3m_embeddings_urls.npy"), str(directory / DB_FILE), progress=False)
    from gill.integrity import write_checksums

    write_checksums(directory)  # the decision head changed on purpose: the server verifies checksums at start
    return directory


@pytest.fixture(scope="session")
def server(served_dir):
    """tritonserver on loopback with every model, requiring wire.API_KEY on everything but health checks, with
    wire.SERVED_LIMITS set as `gill serve --limit` sets them."""
    from gill.serving.server import TritonServer

    parameters = SERVED_LIMITS.model_parameters()
    parameters["gill"]["heartbeat_s"] = "1"  # quiet turns get heartbeats within the tests' patience
    if os.environ.get("GILL_TEST_TRANSPORT"):  # bls or grpc: run the served tests over the other transport too
        parameters["gill"]["transport"] = os.environ["GILL_TEST_TRANSPORT"]
    # A stuck loop (tiny steps take milliseconds) is reloaded within the tests' patience.
    with TritonServer(served_dir, api_key=API_KEY, parameters=parameters, stall_s=20) as running:
        yield running
