"""The typed events one dialogue turn streams, in order: text deltas and images, then ``Done``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta (UTF-8 complete; never splits a character)."""

    text: str


@dataclass(frozen=True)
class ImageRequest:
    """The model asked for an image: ``[IMG0..7]`` were produced at this point of the text.

    ``hidden_states`` is ``[8, lm_width]``: the last-layer states at the 8 ``[IMG]`` positions.
    """

    index: int
    hidden_states: torch.Tensor


@dataclass(frozen=True)
class DiffusionPreview:
    """A cheap low-resolution look at a generation in progress (from the latents, no VAE decode)."""

    index: int
    step: int
    total_steps: int
    image: Image.Image


@dataclass(frozen=True)
class ImageResult:
    """The image shown for request ``index``: retrieved from the corpus or generated.

    ``score`` is the retrieval score (``exp(logit_scale) * cosine``) for a retrieved image and the cosine
    of the generated image to the text-side retrieval vector for a generated one. ``probabilities`` are the
    decision head's (p_generate, p_retrieve), or None without a decision head. ``corpus_id`` is a retrieved
    image's corpus row (sent back with the image in later turns, it keeps the image from being retrieved again).
    """

    index: int
    source: Literal["retrieved", "generated"]
    image: Image.Image
    decision: Literal["gen", "ret"]
    probabilities: tuple[float, float] | None
    score: float | None = None
    url: str | None = None
    caption: str | None = None
    corpus_id: int | None = None  # the retrieved image's row in the corpus


@dataclass(frozen=True)
class Notice:
    """Something the user should know about image ``index`` that did not stop the turn: ``code``
    ``retrieval_failed`` (no top hit's image could be loaded, e.g. dead URLs) or ``retrieval_unavailable`` (the
    corpus backend is down); the turn went on with generation when it could."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class Done:
    """The turn ended. ``stop_reason``: eos, newline, length or cancelled."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str
    timings: dict[str, float] = field(default_factory=dict)


Event = TextDelta | ImageRequest | DiffusionPreview | ImageResult | Notice | Done
