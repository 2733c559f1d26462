"""Does the pocket model do the right thing? Prompts of the shapes world, asked through a client, judged by a program.

:class:`QualityProbe` sends each prompt through a ``gill_client.GillClient`` (the served path) and judges the images
and text that come back (:func:`gill.pocket.judge.judge`); every method returns a :class:`Rate`. The prompt sets:

- :func:`heldout_prompts`: the scenes no training set held ("show me a purple triangle on a green background");
- :func:`retrieval_prompts`: every (colour, shape) pair ("show me a red circle") and the held-out scenes;
- :func:`caption_prompts`: images of random scenes (a jitter no training set used), to caption.

Usage::

    with GillClient(url) as client:
        print(QualityProbe(client, World(seed=0)).show_me(heldout_prompts(World(seed=0))))
"""

from __future__ import annotations

import io
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from gill.pocket.judge import judge
from gill.pocket.world import World
from gill.tiny import COLOURS, SHAPES

# Denoising the pocket SD's 16 x 16 latents: DPM-Solver++ at 20 steps is what the docs measure with.
GENERATION = {"scheduler": "dpm++", "num_inference_steps": 20, "seed": 0}


@dataclass(frozen=True)
class Prompt:
    """What to send (text and/or an image) and what a right answer shows (``colour`` and ``shape`` required)."""

    text: str | None
    colour: str
    shape: str
    image: Image.Image | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Rate:
    """Fractions of ``prompts`` judged right; ``images``: how many prompts got an image (text checks: answers)."""

    what: str
    prompts: int
    images: int
    colour: float
    colour_and_shape: float
    failures: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = "; ".join(self.failures[:6])
        return (f"{self.what}: {self.prompts} prompts, {self.images} images, colour {self.colour:.0%}, colour and "
                f"shape {self.colour_and_shape:.0%}" + (f" (wrong: {shown})" if shown else ""))


def heldout_prompts(world: World, verb: str = "show me") -> list[Prompt]:
    return [Prompt(f"{verb} {scene.caption}", scene.colour, scene.shape) for scene in world.heldout_scenes]


def retrieval_prompts(world: World) -> list[Prompt]:
    pairs = [Prompt(f"show me a {colour} {shape}", colour, shape)
             for colour, shape in itertools.product(sorted(COLOURS), SHAPES)]
    return pairs + heldout_prompts(world)


def caption_prompts(world: World, count: int, seed: int = 7) -> list[Prompt]:
    rng = random.Random(f"caption-{seed}")
    scenes = rng.sample(world.train_scenes + world.heldout_scenes, count)
    return [Prompt("what is this?", scene.colour, scene.shape, world.render(scene, rng)) for scene in scenes]


def named_colour(text: str) -> str | None:
    """The first colour word of ``text`` (the colour of the shape, in the world's captions), or None."""
    for word in text.replace(".", " ").split():
        if word in COLOURS:
            return word
    return None


class QualityProbe:
    """Asks a served pocket model (a ``GillClient``) and judges the answers."""

    def __init__(self, client: Any, world: World, retry_within_s: float = 180.0) -> None:
        self.client = client
        self.world = world
        self.retry_within_s = retry_within_s
        self.lost: list[str] = []  # turns lost to a stub that died (Triton 2.51, issue 6), then asked again

    def _ask(self, prompt: Prompt, **options: Any):
        """One turn; one lost to a dead stub (``Unavailable``, or ``NotFound`` while the model reloads) is asked
        again, as a client should: the same prompt and seed give the same answer, so the rates are unchanged."""
        from gill_client import ChatOptions, NotFound, Unavailable, user

        parts = [part for part in (prompt.image, prompt.text) if part is not None]
        deadline = time.monotonic() + self.retry_within_s
        while True:
            try:
                return self.client.chat([user(*parts)], ChatOptions(max_new_tokens=24, **options)).collect()
            except (Unavailable, NotFound) as error:
                if time.monotonic() > deadline:
                    raise
                self.lost.append(f"{prompt.text}: {error}")
                time.sleep(1.0)

    def _judge_images(self, what: str, prompts: list[Prompt], **options: Any) -> Rate:
        colour = both = images = 0
        failures = []
        for prompt in prompts:
            reply = self._ask(prompt, **options)
            if not reply.images:
                failures.append(f"{prompt.text!r} -> no image ({reply.text!r})")
                continue
            images += 1
            judged = judge(Image.open(io.BytesIO(reply.images[0].png)))
            colour += judged.colour == prompt.colour
            both += judged.colour == prompt.colour and judged.shape == prompt.shape
            if (judged.colour, judged.shape) != (prompt.colour, prompt.shape):
                failures.append(f"{prompt.text!r} -> {reply.images[0].source} {judged.colour} {judged.shape}")
        return Rate(what, len(prompts), images, colour / len(prompts), both / len(prompts), tuple(failures))

    def show_me(self, prompts: list[Prompt]) -> Rate:
        """The served default: the model decides whether to show an image, and whether to retrieve or generate."""
        return self._judge_images("show me (retrieved or generated)", prompts, **GENERATION)

    def retrieve(self, prompts: list[Prompt]) -> Rate:
        return self._judge_images("retrieval top-1", prompts, allow_generation=False)

    def generate(self, prompts: list[Prompt]) -> Rate:
        return self._judge_images("generation", prompts, allow_retrieval=False, **GENERATION)

    def caption(self, prompts: list[Prompt]) -> Rate:
        """An image and "what is this?" are sent; the answer should name the shape's colour (and its shape)."""
        colour = both = 0
        failures = []
        for prompt in prompts:
            text = self._ask(prompt, max_images=0).text
            named = named_colour(text)
            colour += named == prompt.colour
            both += named == prompt.colour and prompt.shape in text
            if named != prompt.colour or prompt.shape not in text:
                failures.append(f"{prompt.colour} {prompt.shape} -> {text!r}")
        return Rate("caption", len(prompts), len(prompts), colour / len(prompts), both / len(prompts),
                    tuple(failures))

