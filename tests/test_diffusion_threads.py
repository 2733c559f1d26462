"""The served ``diffusion`` model runs every request on its own thread against one ``ImageGenerator``."""

from __future__ import annotations

import threading

import numpy as np
import torch


def test_concurrent_generations_equal_the_same_generations_one_at_a_time(pipeline):
    # Found by perf_analyzer at concurrency 2: two requests denoising at once shared the scheduler's state,
    # which gave wrong images or an IndexError in the scheduler.
    generator = pipeline.components.generator
    width = generator.pipe.unet.config.cross_attention_dim
    embeds = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(0))
    jobs = [(1, 20), (2, 7)]  # (seed, steps): different lengths, so the denoising loops overlap unevenly
    expected = [np.asarray(generator.generate(embeds, num_inference_steps=steps, seed=seed)) for seed, steps in jobs]

    images: list = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(index: int, seed: int, steps: int) -> None:
        start.wait()
        try:
            images[index] = np.asarray(generator.generate(embeds, num_inference_steps=steps, seed=seed))
        except BaseException as error:  # noqa: BLE001 - reported below, with the other thread's outcome
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for image, reference in zip(images, expected, strict=True):
        assert np.array_equal(image, reference)
