"""The shapes world: held-out scenes stay out of every training text, and the images are what the captions say."""

from __future__ import annotations

import random

import pytest

from gill.pocket.judge import judge
from gill.pocket.world import DRAW_VERBS, HELDOUT_SCENES, SHOW_VERBS, Scene, World, all_scenes
from gill.tiny import COLOURS, SHAPES


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


def test_heldout_scenes_are_out_of_training_but_their_parts_are_in(world):
    heldout, train = set(world.heldout_scenes), set(world.train_scenes)
    assert len(heldout) == HELDOUT_SCENES and not heldout & train
    assert heldout | train == set(all_scenes()) and len(all_scenes()) == 8 * 3 * 7
    # Every colour, shape and background, and every (colour, shape) pair, is still seen in training.
    assert {s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)
    assert {s.background for s in train} == set(COLOURS)
    assert {(s.colour, s.shape) for s in train} == {(c, s) for c in COLOURS for s in SHAPES}
    assert World(seed=1).heldout_scenes != world.heldout_scenes  # the split follows the seed
    assert World(seed=0).heldout_scenes == world.heldout_scenes


def test_training_text_never_mentions_a_heldout_scene(world):
    corpus = "\n".join(world.lm_corpus(random.Random(0), 3000))
    decisions = "\n".join(prompt for prompt, _ in world.decision_rows(random.Random(0), 500))
    pairs = "\n".join(pair.text for pair in world.pairs(500, random.Random(0)))
    for scene in world.heldout_scenes:
        assert scene.caption not in corpus and scene.caption not in decisions and scene.caption not in pairs
    assert "Q: show me" in corpus and "\nA: here is" in corpus and "A: i drew" in corpus


def test_role_documents_bind_each_colour_to_what_it_colours(world):
    """The LM's "a red circle on a blue background. the circle is red and the background is blue" documents (what
    lets [IMG0] tell a red circle on blue from a blue circle on red) never swap the roles."""
    documents = [d for d in world.lm_corpus(random.Random(1), 2000) if " and the " in d or " and the background" in d]
    assert len(documents) > 200  # about one in five
    orders = set()
    for document in documents:
        caption, roles = document.split(". ")
        scene = Scene.from_caption(caption)
        assert sorted(roles.split(" and ")) == sorted([f"the {scene.shape} is {scene.colour}",
                                                       f"the background is {scene.background}"]), document
        orders.add(roles.startswith("the background"))
    assert orders == {True, False}  # both orders, so position alone does not say which colour is which


def test_training_pairs_say_what_their_image_shows(world):
    pairs = world.pairs(200, random.Random(4))
    kinds = {pair.text.split(" ", 2)[1] if pair.text.startswith("Q:") else "caption" for pair in pairs}
    assert {"caption", "what"} <= kinds and kinds & {"show", "find"} and kinds & {"draw", "paint", "make"}, kinds
    for pair in pairs:
        assert pair.caption in (pair.scene.caption, pair.scene.short_caption)
        assert pair.text.endswith(pair.caption)  # the image's caption closes the text, where [IMG0] follows
        assert judge(pair.image).colour == pair.scene.colour


def test_decision_labels_follow_the_verb(world):
    rows = world.decision_rows(random.Random(3), 200)
    assert {label for _, label in rows} == {"ret", "gen"}
    for prompt, label in rows:
        verbs = SHOW_VERBS if label == "ret" else DRAW_VERBS
        assert any(prompt.startswith(f"Q: {verb} a ") for verb in verbs), prompt


@pytest.mark.parametrize("seed", range(3))
def test_images_show_what_the_caption_says(world, seed):
    rng = random.Random(seed)
    for scene in rng.sample(all_scenes(), 40):
        judged = judge(world.render(scene, rng))
        assert (judged.colour, judged.shape, judged.background) == (scene.colour, scene.shape, scene.background)
        assert Scene.from_caption(scene.caption) == scene


def test_a_caption_that_is_not_the_worlds_is_refused():
    with pytest.raises(ValueError, match="not a caption"):
        Scene.from_caption("a red circle")


def test_twins_differ_in_shape_or_swap_colours_and_are_never_heldout(world):
    heldout = set(world.heldout_scenes)
    scene = Scene("red", "circle", "blue")
    twins = world.twins(scene)
    expected = {Scene("red", "square", "blue"), Scene("red", "triangle", "blue"), Scene("blue", "circle", "red")}
    assert set(twins) == expected - heldout and scene not in twins
    for scene in world.train_scenes:
        for twin in world.twins(scene):
            assert twin not in heldout and twin != scene
            assert (twin.colour, twin.background) in ((scene.colour, scene.background),
                                                     (scene.background, scene.colour))
    assert any(len(world.twins(s)) < 3 for s in world.train_scenes)  # a held-out twin is left out, not drawn

