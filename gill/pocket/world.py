"""The shapes world: small images of one coloured shape on a coloured background, and the text that goes with them.

Everything a program needs to check the pocket model: a scene is ``(colour, shape, background)`` with two distinct
colours from :data:`gill.tiny.COLOURS`; its image is drawn with a random size and offset; its caption says what it
is ("a red circle on a blue background", or the short "a red circle"). A fixed set of scenes is held out of every
training set (LM text, CLIP, diffusion, adapters), so a test can ask for a combination the model never saw.

Usage::

    world = World(seed=0)
    world.train_scenes[:2], world.heldout_scenes[:2]
    world.render(Scene("red", "circle", "blue"), random.Random(1))      # a 32 x 32 RGB PIL image
    world.lm_corpus(random.Random(0), 5000)                             # dialogue and caption text
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cached_property

from PIL import Image, ImageDraw

from gill.tiny import COLOURS, SHAPES

IMAGE_SIZE = 32
# About one scene in ten is held out; every colour, shape and background still appears in training.
HELDOUT_SCENES = 16
# Words a user asks with; "show" asks for a picture that exists (retrieve), "draw" for a new one (generate).
SHOW_VERBS = ("show me", "find me", "show me a picture of")
DRAW_VERBS = ("draw", "draw me", "paint", "make me a drawing of")
# A scene and its twins (World.twins): its two other shapes and its colours swapped.
TWIN_GROUP = 4


@dataclass(frozen=True, order=True)
class Scene:
    """One combination of the world: a ``colour`` ``shape`` on a ``background`` (two different colours)."""

    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def short_caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """The scene a full caption describes ("a red circle on a blue background")."""
        words = caption.split()
        if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
            raise ValueError(f"not a caption of the shapes world: {caption!r}")
        return cls(words[1], words[2], words[5])


def all_scenes() -> list[Scene]:
    """Every scene of the world, sorted (8 colours x 3 shapes x 7 backgrounds = 168)."""
    return [Scene(c, s, b) for c, s, b in itertools.product(sorted(COLOURS), SHAPES, sorted(COLOURS)) if c != b]


def draw_scene(scene: Scene, size: int = IMAGE_SIZE, rng: random.Random | None = None) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``scene``: centred and 3/5 of the side without ``rng``, else of a random
    size (1/2 to 3/4 of the side) and offset, always wholly inside the image."""
    extent = size * 3 // 5 if rng is None else rng.randint(size // 2, size * 3 // 4)
    slack = size - extent
    left = slack // 2 if rng is None else rng.randint(slack // 4, slack - slack // 4)
    top = slack // 2 if rng is None else rng.randint(slack // 4, slack - slack // 4)
    right, bottom = left + extent - 1, top + extent - 1
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; the world has {SHAPES}")
    return image


@dataclass(frozen=True)
class Pair:
    """One training pair: the ``text`` GILL reads beside the ``image``; ``caption`` is what the image shows, in
    the world's words (the text Stable Diffusion's targets are computed from)."""

    scene: Scene
    caption: str
    text: str
    image: Image.Image = field(repr=False)


class World:
    """The scenes of one seed, split into training and held-out ones, and the text and images built from them."""

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE) -> None:
        self.seed = seed
        self.size = size

    @cached_property
    def heldout_scenes(self) -> list[Scene]:
        """:data:`HELDOUT_SCENES` scenes, no two sharing a (colour, shape) pair, so each pair keeps 6 of its 7
        backgrounds in training."""
        rng = random.Random(f"heldout-{self.seed}")
        pairs = rng.sample(list(itertools.product(sorted(COLOURS), SHAPES)), HELDOUT_SCENES)
        return sorted(Scene(c, s, rng.choice([b for b in sorted(COLOURS) if b != c])) for c, s in pairs)

    @cached_property
    def train_scenes(self) -> list[Scene]:
        heldout = set(self.heldout_scenes)
        return [scene for scene in all_scenes() if scene not in heldout]

    def twins(self, scene: Scene) -> list[Scene]:
        """The training scenes that differ from ``scene`` in one way a caption names but a careless encoder
        blurs: its other shapes (same colours), and its colours swapped (the shape in the background's colour on
        the shape's). Put beside ``scene`` in a contrastive batch, they make the hard negatives."""
        candidates = [Scene(scene.colour, shape, scene.background) for shape in SHAPES if shape != scene.shape]
        candidates.append(Scene(scene.background, scene.shape, scene.colour))
        heldout = set(self.heldout_scenes)
        return [candidate for candidate in candidates if candidate not in heldout]

    def render(self, scene: Scene, rng: random.Random | None = None) -> Image.Image:
        return draw_scene(scene, self.size, rng)

    def caption(self, scene: Scene, rng: random.Random) -> str:
        """What a training pair says about ``scene``: the full caption, or one time in four the short one."""
        return scene.short_caption if rng.random() < 0.25 else scene.caption

    def pairs(self, count: int, rng: random.Random, heldout: bool = False, twin_groups: bool = False) -> list[Pair]:
        """``count`` training pairs of the training (or held-out) scenes, each image jittered.

        The text is the caption inside a dialogue exchange, as a served turn puts it, four times in five:
        "Q: what is this?\nA: {caption}" (so an image before a question informs the answer), "Q: show me
        {caption}\nA: here is {caption}" or "Q: draw {caption}\nA: i drew {caption}" (so ``[IMG0]`` follows an
        answer as it follows a caption); otherwise the plain caption. Served retrieval always reads ``[IMG0]`` after
        such an answer, and with half the texts plain captions the retrieval space fitted captions at the answers'
        expense (held-out "show me" scenes: 31% colour and shape, against 81% with this mix, in a retrieval-only
        probe on the same LM).

        ``twin_groups``: groups of :data:`TWIN_GROUP` consecutive pairs, a random scene then its :meth:`twins`
        (random scenes where a twin is held out), for a loader that keeps groups together (``group_size``).
        """
        scenes = self.heldout_scenes if heldout else self.train_scenes
        pairs: list[Pair] = []
        while len(pairs) < count:
            scene = rng.choice(scenes)
            pairs.append(self._pair(scene, rng))
            if twin_groups:
                twins = [twin for twin in self.twins(scene) if twin in scenes]
                twins += [rng.choice(scenes) for _ in range(TWIN_GROUP - 1 - len(twins))]
                pairs += [self._pair(twin, rng) for twin in twins]
        return pairs[:count]

    def _pair(self, scene: Scene, rng: random.Random) -> Pair:
        caption = self.caption(scene, rng)
        kind = rng.random()
        if kind < 0.2:
            text = caption
        elif kind < 0.35:
            text = f"Q: what is this?\nA: {caption}"
        elif kind < 0.8:
            text = f"Q: {rng.choice(SHOW_VERBS)} {caption}\nA: here is {caption}"
        else:
            text = f"Q: {rng.choice(DRAW_VERBS)} {caption}\nA: i drew {caption}"
        return Pair(scene, caption, text, self.render(scene, rng))

    # --- text -------------------------------------------------------------------------------------------------

    def show_prompt(self, scene: Scene, rng: random.Random, short: bool = False) -> str:
        return f"{rng.choice(SHOW_VERBS)} {scene.short_caption if short else scene.caption}"

    def draw_prompt(self, scene: Scene, rng: random.Random, short: bool = False) -> str:
        return f"{rng.choice(DRAW_VERBS)} {scene.short_caption if short else scene.caption}"

    def _exchange(self, scene: Scene, rng: random.Random) -> str:
        """One question and its answer in the served dialogue format (``Q: ...\\nA: ...\\n``)."""
        short = rng.random() < 0.4
        described = scene.short_caption if short else scene.caption
        kind = rng.random()
        if kind < 0.4:
            return f"Q: {self.show_prompt(scene, rng, short)}\nA: here is {described}\n"
        if kind < 0.7:
            return f"Q: {self.draw_prompt(scene, rng, short)}\nA: i drew {described}\n"
        if kind < 0.85:
            return f"Q: what colour is the {scene.shape}?\nA: the {scene.shape} is {scene.colour}\n"
        return f"Q: what is this?\nA: {described}\n"

    def lm_document(self, rng: random.Random) -> str:
        """One training document of the world's LM: a caption, a caption said again, a caption with what each
        colour belongs to, or a short dialogue."""
        if rng.random() < 0.2:
            # "a red circle on a blue background. the circle is red and the background is blue": predicting the
            # colours after "the circle is" binds each colour to its role, which [IMG0] must read to tell a red
            # circle on blue from a blue circle on red (without these documents retrieval swapped them).
            scene = rng.choice(self.train_scenes)
            roles = [f"the {scene.shape} is {scene.colour}", f"the background is {scene.background}"]
            if rng.random() < 0.5:
                roles.reverse()
            return f"{scene.caption}. {roles[0]} and {roles[1]}"
        scene = rng.choice(self.train_scenes)
        kind = rng.random()
        if kind < 0.2:
            return self.caption(scene, rng)
        if kind < 0.4:
            # A caption said twice: the second half is predictable only by copying the first, which is what the
            # dialogues need (an answer restates its question) and what a small LM learns slowly from them alone.
            caption = self.caption(scene, rng)
            return f"{caption}. {caption}"
        turns = [self._exchange(scene, rng)]
        while rng.random() < 0.4:
            turns.append(self._exchange(rng.choice(self.train_scenes), rng))
        return "".join(turns).rstrip("\n")

    def lm_corpus(self, rng: random.Random, count: int) -> list[str]:
        return [self.lm_document(rng) for _ in range(count)]

    def decision_rows(self, rng: random.Random, count: int) -> list[tuple[str, str]]:
        """(prompt, label) rows in the PartiPrompts sense: ``ret`` for "show me ...", ``gen`` for "draw ...",
        over the training scenes, each prompt as the served dialogue puts it before ``[IMG0]``."""
        rows = []
        for _ in range(count):
            scene, short = rng.choice(self.train_scenes), rng.random() < 0.4
            described = scene.short_caption if short else scene.caption
            if rng.random() < 0.5:
                rows.append((f"Q: {self.show_prompt(scene, rng, short)}\nA: here is {described}", "ret"))
            else:
                rows.append((f"Q: {self.draw_prompt(scene, rng, short)}\nA: i drew {described}", "gen"))
        return rows
