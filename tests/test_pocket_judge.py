"""The shapes-world judge (gill/pocket/judge.py): its accuracy on clean and degraded renders, and the cases a score
could hide (a background mistaken for the shape, a plain or noise image called a shape)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from gill.pocket import judge as judge_module
from gill.pocket.judge import Judgement, degrade, judge, judge_accuracy
from gill.pocket.world import Scene, World, draw_scene
from gill.tiny import COLOURS

# Scenes that stress the judge: the closest palette pair (yellow/orange), the extremes (white/black), and colours
# whose blends with each other look like a third palette colour (red and blue make purple).
HARD_SCENES = [Scene("red", "circle", "blue"), Scene("yellow", "triangle", "orange"), Scene("white", "square", "black"),
               Scene("black", "triangle", "white"), Scene("orange", "circle", "red"), Scene("blue", "square", "purple")]


def test_clean_renders_are_judged_right():
    accuracy = judge_accuracy(World(seed=0), samples=120, seed=0)
    assert (accuracy.colour, accuracy.background, accuracy.samples) == (1.0, 1.0, 120)
    assert accuracy.shape >= 0.95


def test_degraded_renders_are_still_judged_right():
    # Strength 1 is clearly blurred and noisy (the measured accuracy is 1.0 on all three); the margin is for seeds.
    accuracy = judge_accuracy(World(seed=0), samples=120, seed=1, strength=1.0)
    assert accuracy.colour >= 0.95 and accuracy.background >= 0.95
    assert accuracy.shape >= 0.95


@pytest.mark.parametrize("scene", HARD_SCENES, ids=lambda scene: scene.caption)
def test_specific_scenes_any_size(scene: Scene):
    expected = Judgement(scene.colour, scene.background, scene.shape)
    assert judge(draw_scene(scene)) == expected
    # Another size is judged as 32 x 32; a degraded render at the intended strength too.
    assert judge(draw_scene(scene, 96, random.Random(3))) == expected
    assert judge(degrade(draw_scene(scene, rng=random.Random(4)), np.random.default_rng(4), 1.0)) == expected


@pytest.mark.parametrize("scene", HARD_SCENES, ids=lambda scene: scene.caption)
def test_swapping_colour_and_background_swaps_the_judgement(scene: Scene):
    swapped = Scene(scene.background, scene.shape, scene.colour)
    layout = random.Random(7)
    assert judge(draw_scene(scene, rng=layout)) == Judgement(scene.colour, scene.background, scene.shape)
    assert judge(draw_scene(swapped, rng=layout)) == Judgement(scene.background, scene.colour, scene.shape)


def test_plain_image_has_no_shape_and_the_nearest_other_colour():
    # Documented behaviour: no shape; background is the image's colour; colour is the nearest other palette colour.
    assert judge(Image.new("RGB", (32, 32), COLOURS["blue"])) == Judgement("purple", "blue", None)
    assert judge(Image.new("RGB", (48, 48), COLOURS["white"])) == Judgement("yellow", "white", None)
    noisy = degrade(Image.new("RGB", (32, 32), COLOURS["red"]), np.random.default_rng(0), 1.0)
    assert judge(noisy).shape is None and judge(noisy).background == "red"


def test_noise_image_has_no_shape():
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert judge(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))).shape is None


def test_degrade_is_identity_at_zero_and_seeded_otherwise():
    image = draw_scene(Scene("green", "circle", "white"), rng=random.Random(0))
    assert np.array_equal(np.asarray(degrade(image, np.random.default_rng(0), 0.0)), np.asarray(image))
    once = np.asarray(degrade(image, np.random.default_rng(5), 1.0), dtype=np.float32)
    again = np.asarray(degrade(image, np.random.default_rng(5), 1.0), dtype=np.float32)
    assert np.array_equal(once, again)
    # Strength 1 moves pixels by about 20 of 255 on average (noise, blur at the edges, a colour cast).
    assert np.abs(once - np.asarray(image, dtype=np.float32)).mean() > 8.0


def test_accuracy_counts_a_missing_shape_as_wrong(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(judge_module, "judge", lambda image: Judgement("red", "blue", None))
    accuracy = judge_accuracy(World(seed=0), samples=40)
    assert accuracy.shape == 0.0
    assert 0.0 < accuracy.colour < 0.5 and 0.0 < accuracy.background < 0.5
