"""The served ``diffusion`` model: the SCHEDULER input, and concurrent requests denoised in one batch."""

from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import np_to_triton_dtype
from wire import API_KEY, PROMPT_GEN, bytes_input, events, metric, request, user

from gill import protocol
from gill.config import GILLArgs
from gill.corpus import RetrievalSettings
from gill.pipeline import Pipeline
from gill_client import _transport as transport

BATCH_TOLERANCE = 2  # batched kernels may round a pixel differently from batch 1 (test_diffusion_schedulers.py)


def _inputs(served_dir, prompt: int, seed: int, steps: int, scheduler: str) -> list:
    args = GILLArgs.load(served_dir)
    embeds = torch.randn(1, args.num_clip_tokens, args.gen_emb_dim, generator=torch.Generator().manual_seed(prompt))
    values = [("PROMPT_EMBEDS", embeds.numpy()), ("STEPS", np.array([steps], dtype=np.int32)),
              ("SEED", np.array([seed], dtype=np.int64))]
    inputs = []
    for name, array in values:
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return [*inputs, bytes_input("SCHEDULER", scheduler.encode())]


class _Stream:
    """One open streaming call to the diffusion model; ``send`` then ``close`` collects its (result, error)s."""

    def __init__(self, server) -> None:
        self.results: list = []
        self.client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        self.client.start_stream(callback=lambda result, error: self.results.append((result, error)),
                                 stream_timeout=300, headers={transport.API_KEY_HEADER: API_KEY})

    def send(self, inputs: list) -> None:
        self.client.async_stream_infer("diffusion", inputs)

    def close(self) -> list:
        self.client.stop_stream()  # waits for the call's last response
        self.client.close()
        return self.results


def _image(results: list) -> np.ndarray:
    assert [error for _, error in results if error is not None] == []
    images = [r.as_numpy("IMAGE") for r, _ in results if r.as_numpy("IMAGE") is not None]
    assert len(images) == 1
    return np.asarray(Image.open(io.BytesIO(bytes(images[0].reshape(-1)[0])))).astype(np.int16)


def test_concurrent_requests_denoise_in_one_batch_and_give_the_images_they_get_alone(server, served_dir):
    jobs = [(0, 31), (1, 32), (2, 31)]  # (prompt, seed)
    alone = []
    for prompt, seed in jobs:
        stream = _Stream(server)
        stream.send(_inputs(served_dir, prompt, seed, 4, "dpm++"))
        alone.append(_image(stream.close()))
    batches_before = metric(server, "gill_diffusion_batches_total")
    streams = [_Stream(server) for _ in jobs]
    start = threading.Barrier(len(jobs))

    def send(stream: _Stream, prompt: int, seed: int) -> None:
        start.wait()
        stream.send(_inputs(served_dir, prompt, seed, 4, "dpm++"))

    threads = [threading.Thread(target=send, args=(stream, *job)) for stream, job in zip(streams, jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = [_image(stream.close()) for stream in streams]
    # At least two of the three shared a loop (the first may start alone, before the others arrive).
    assert metric(server, "gill_diffusion_batches_total") - batches_before < len(jobs)
    for got, expected in zip(together, alone, strict=True):
        assert np.abs(got - expected).max() <= BATCH_TOLERANCE
    assert not np.array_equal(alone[0], alone[1])


@pytest.mark.parametrize("name", ["euler", "", "PNDM"])
def test_an_unknown_scheduler_is_invalid_argument(server, served_dir, name):
    stream = _Stream(server)
    stream.send(_inputs(served_dir, 0, 1, 2, name))
    errors = [error for _, error in stream.close() if error is not None]
    assert len(errors) == 1
    assert "scheduler=" in str(errors[0]) and "allowed: 'pndm' or 'dpm++'" in str(errors[0])
    assert "INVALID_ARG" in str(errors[0].status()) or "InputError" in str(errors[0])


def test_a_served_turn_with_dpm_solver_equals_the_in_process_turn(server, served_dir):
    local = Pipeline.from_checkpoint(served_dir, device="cpu", retrieval=RetrievalSettings(retriever="exact"))
    chat = request(user(PROMPT_GEN), ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=5, seed=4,
                   scheduler="dpm++")
    [expected] = local.run(protocol.parts_from_request(chat), protocol.options_from_request(chat)).images
    served = next(e.image for e in events(server, chat) if e.WhichOneof("event") == "image")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(served.png))), np.asarray(expected.image))
    options = dataclasses.replace(protocol.options_from_request(chat), scheduler="pndm")
    pndm = local.run(protocol.parts_from_request(chat), options).images[0]
    assert not np.array_equal(np.asarray(pndm.image), np.asarray(expected.image))
