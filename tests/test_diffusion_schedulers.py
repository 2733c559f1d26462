"""Schedulers (the reference's PNDM, DPM-Solver++) and batched denoising of ``ImageGenerator``, in-process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from gill.diffusion import DiffusionBatcher, GenerationJob, ImageGenerator, LoopSettings
from gill.errors import InputError
from gill.options import GenerationOptions

# Batched UNet and VAE kernels may round differently from batch 1: pixels may move by a step or two.
BATCH_TOLERANCE = 2


@pytest.fixture(scope="module")
def generator(pipeline) -> ImageGenerator:
    return pipeline.components.generator


def embeddings(generator: ImageGenerator, seed: int) -> torch.Tensor:
    width = generator.pipe.unet.config.cross_attention_dim
    return torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_dpm_solver_at_20_steps_is_deterministic_and_differs_from_pndm(generator):
    embeds = embeddings(generator, 0)
    first = pixels(generator.generate(embeds, scheduler="dpm++", num_inference_steps=20, seed=3))
    second = pixels(generator.generate(embeds, scheduler="dpm++", num_inference_steps=20, seed=3))
    pndm = pixels(generator.generate(embeds, scheduler="pndm", num_inference_steps=20, seed=3))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, pndm)
    assert generator.planned_steps(20, "dpm++") == 20 and generator.planned_steps(20, "pndm") == 21


def test_schedulers_leak_no_state_into_each_other(generator):
    embeds = embeddings(generator, 1)
    fresh = pixels(generator.generate(embeds, num_inference_steps=4, seed=5))  # default: the reference's PNDM
    generator.generate(embeds, scheduler="dpm++", num_inference_steps=6, seed=9)
    after = pixels(generator.generate(embeds, scheduler="pndm", num_inference_steps=4, seed=5))
    assert np.array_equal(after, fresh)
    dpm = pixels(generator.generate(embeds, scheduler="dpm++", num_inference_steps=3, seed=5))
    assert np.array_equal(pixels(generator.generate(embeds, scheduler="dpm++", num_inference_steps=3, seed=5)), dpm)


def test_unknown_scheduler_is_an_input_error(generator):
    with pytest.raises(InputError, match=r"unknown scheduler 'euler' \(allowed: pndm, dpm\+\+\)"):
        generator.generate(embeddings(generator, 0), scheduler="euler", num_inference_steps=2)
    with pytest.raises(InputError, match=r"scheduler='euler' \(allowed: 'pndm' or 'dpm\+\+'\)"):
        GenerationOptions(scheduler="euler")
    assert GenerationOptions().scheduler == "pndm"  # the reference's stays the default


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++"])
def test_a_batched_image_equals_the_image_alone(generator, scheduler):
    jobs = [GenerationJob(embeddings(generator, index), seed=seed) for index, seed in enumerate((11, 12, 11))]
    alone = [pixels(generator.generate(job.prompt_embeds, scheduler=scheduler, num_inference_steps=4,
                                       seed=job.seed)) for job in jobs]
    batched = generator.generate_batch(jobs, scheduler=scheduler, num_inference_steps=4)
    for got, expected in zip(batched, alone, strict=True):
        assert np.abs(pixels(got) - expected).max() <= BATCH_TOLERANCE
    assert not np.array_equal(alone[0], alone[1])  # different prompts and seeds, different images


def test_each_job_of_a_batch_gets_its_own_steps_and_previews(generator):
    seen: dict[int, list] = {0: [], 1: []}

    def job(row: int, every: int) -> GenerationJob:
        return GenerationJob(embeddings(generator, row), seed=row, preview_every=every,
                             on_step=lambda step, total: seen[row].append(("step", step, total)),
                             on_preview=lambda step, total, image: seen[row].append(("preview", step, image.size)))

    generator.generate_batch([job(0, 1), job(1, 0)], scheduler="dpm++", num_inference_steps=3)
    latent = generator.pipe.unet.config.sample_size
    assert [e for e in seen[0] if e[0] == "step"] == [("step", s, 3) for s in (1, 2, 3)]
    assert [e for e in seen[0] if e[0] == "preview"] == [("preview", s, (latent, latent)) for s in (1, 2, 3)]
    assert seen[1] == [("step", s, 3) for s in (1, 2, 3)]


def test_a_cancelled_job_stops_alone_and_the_loop_only_when_all_are(generator):
    unet_calls: list[int] = []
    handle = generator.pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        stop_first = threading.Event()
        jobs = [GenerationJob(embeddings(generator, 0), seed=1, cancel=stop_first.is_set,
                              on_step=lambda step, total: stop_first.set() if step == 1 else None),
                GenerationJob(embeddings(generator, 1), seed=2)]
        images = generator.generate_batch(jobs, num_inference_steps=5)
        assert images[0] is None and images[1] is not None
        assert len(unet_calls) == generator.planned_steps(5)  # the other request went on to the end
        unet_calls.clear()
        everyone = threading.Event()
        jobs = [GenerationJob(embeddings(generator, row), seed=row, cancel=everyone.is_set,
                              on_step=lambda step, total: everyone.set() if step == 2 else None) for row in (0, 1)]
        assert generator.generate_batch(jobs, num_inference_steps=20) == [None, None]
        assert len(unet_calls) == 2  # stopped right after the step where both were cancelled
    finally:
        handle.remove()


def test_the_batcher_groups_concurrent_requests_with_equal_settings(generator):
    sizes: list[int] = []
    batcher = DiffusionBatcher(generator, max_batch=2, window_s=1.0, on_batch=sizes.append)
    settings = {"a": LoopSettings("dpm++", 3, 7.5), "b": LoopSettings("pndm", 3, 7.5)}
    requests = [("a", 0, 21), ("b", 1, 22), ("a", 2, 23), ("a", 3, 24)]  # (settings, prompt, seed)
    expected = [pixels(generator.generate(embeddings(generator, prompt), scheduler=settings[key].scheduler,
                                          num_inference_steps=3, seed=seed)) for key, prompt, seed in requests]
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(index: int, key: str, prompt: int, seed: int) -> None:
        start.wait()
        results[index] = batcher.generate(GenerationJob(embeddings(generator, prompt), seed=seed), settings[key])

    threads = [threading.Thread(target=run, args=(i, *r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    # Three "a" requests over max_batch 2 and one "b": three loops, the full "a" pair among them.
    assert sorted(sizes) == [1, 1, 2]
    for got, want in zip(results, expected, strict=True):
        assert np.abs(pixels(got) - want).max() <= BATCH_TOLERANCE


def test_a_request_cancelled_while_it_waits_leaves_the_queue(generator):
    sizes: list[int] = []
    batcher = DiffusionBatcher(generator, max_batch=4, window_s=0.0, on_batch=sizes.append)
    busy = threading.Thread(target=batcher.generate, args=(GenerationJob(embeddings(generator, 0), seed=0),
                                                           LoopSettings("pndm", 4, 7.5)))
    busy.start()
    deadline = time.monotonic() + 30
    while not sizes:  # the first loop is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled = threading.Event()
    cancelled.set()
    started = time.monotonic()
    assert batcher.generate(GenerationJob(embeddings(generator, 1), seed=1, cancel=cancelled.is_set),
                            LoopSettings("pndm", 4, 7.5)) is None
    assert time.monotonic() - started < 1.0  # did not wait for the running loop
    busy.join(timeout=120)
    time.sleep(0.2)
    assert sizes == [1]  # the cancelled request never ran
