"""The pocket model through the served path (tritonserver, gRPC, the typed client), judged by a program.

Each test asks the committed pocket checkpoint (``gill/data/pocket``, the default of ``gill serve``) for something
whose right answer a program can check (:mod:`gill.pocket.judge`), over a set of prompts, and requires the rate the
issue sets. The rates measured at build time are in ``docs/pocket.md``; ``bench/pocket_quality.py`` measures them
over more prompts.
"""

from __future__ import annotations

import pytest

from gill.pocket.quality import QualityProbe, caption_prompts, heldout_prompts, retrieval_prompts
from gill.pocket.world import World

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe():
    from gill.pocket.default import pocket_checkpoint
    from gill.serving.server import TritonServer
    from gill_client import GillClient

    with TritonServer(pocket_checkpoint()) as server, GillClient(server.endpoints.grpc) as client:
        yield QualityProbe(client, World(seed=0))


def test_show_me_returns_an_image_of_the_asked_colour(probe):
    """'show me a red circle': the image returned (retrieved or generated) is judged red."""
    rate = probe.show_me(heldout_prompts(probe.world))
    assert rate.images == rate.prompts, f"some prompts got no image: {rate}"
    assert rate.colour >= 0.8, rate


def test_retrieval_top1_matches_colour_and_shape(probe):
    rate = probe.retrieve(retrieval_prompts(probe.world))
    assert rate.images == rate.prompts, rate
    assert rate.colour_and_shape >= 0.9, rate


def test_a_caption_names_the_colour_of_the_input_image(probe):
    rate = probe.caption(caption_prompts(probe.world, count=24))
    assert rate.colour >= 0.8, rate


def test_a_heldout_combination_generates_better_than_chance(probe):
    """Scenes no training set held: the generated image is judged right more often than a random guess."""
    rate = probe.generate(heldout_prompts(probe.world, verb="draw")[::2])  # 8 of the 16: denoising is the slow part
    assert rate.images == rate.prompts, rate
    assert rate.colour > 1 / 8 and rate.colour_and_shape > 1 / 24, rate
