"""Per-turn options, validated at the boundary with messages that say what is allowed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from gill.errors import InputError

# Denoising schedulers by name (gill.diffusion builds them): the reference's PNDM, and DPM-Solver++.
SCHEDULERS = ("pndm", "dpm++")
DEFAULT_SCHEDULER = "pndm"


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding and image options of one dialogue turn; defaults are the reference's.

    ``ret_scale_factor`` and ``gen_scale_factor`` above 1 raise the ``[IMG0]`` logit (as the reference:
    ``|logit| * factor``); ``min_word_tokens`` forbids ``[IMG0]`` for that many first steps.
    ``temperature == 0`` is greedy decoding; ``top_p`` then must stay 1.

    Validation rejects values that make no sense anywhere (NaN, negative, zero tokens or steps); how much one
    request may ask of a server (token, image and step budgets) is :class:`gill.limits.Limits`.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_word_tokens: int = 0
    ret_scale_factor: float = 1.0
    gen_scale_factor: float = 1.0
    max_images: int = 1
    stop_at_newline: bool = True
    stop_at_eos: bool = True
    always_add_bos: bool = False
    allow_retrieval: bool = True
    allow_generation: bool = True
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    # Send a diffusion preview every N denoising steps; 0 sends none.
    preview_every: int = 0
    # Denoising scheduler: "pndm" (the reference's, 50 steps) or "dpm++" (DPM-Solver++, about 20-25 steps).
    scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self) -> None:
        problems = []

        def bad(name: str, allowed: str) -> None:
            problems.append(f"{name}={getattr(self, name)!r} (allowed: {allowed})")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not _is_finite(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0; 0 means greedy")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        elif self.temperature == 0 and self.top_p != 1:
            problems.append("top_p must be 1 with temperature 0 (greedy decoding)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "an integer in [0, 2**63) or None")
        if not _is_int(self.min_word_tokens) or self.min_word_tokens < 0:
            bad("min_word_tokens", "an integer >= 0")
        for name in ("ret_scale_factor", "gen_scale_factor"):
            if not _is_finite(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "a finite number >= 0")
        if not _is_int(self.max_images) or self.max_images < 0:
            bad("max_images", "an integer >= 0")
        if not _is_finite(self.guidance_scale) or not 0 <= self.guidance_scale <= 50:
            bad("guidance_scale", "a number in [0, 50]")
        if not _is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            bad("num_inference_steps", "an integer >= 1")
        if not _is_int(self.preview_every) or self.preview_every < 0:
            bad("preview_every", "an integer >= 0")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", " or ".join(repr(name) for name in SCHEDULERS))
        if problems:
            raise InputError("invalid options: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
