"""Per-turn generation options and the client's retry policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gill_client.v1 import dialogue_pb2 as pb


@dataclass(frozen=True)
class ChatOptions:
    """Options of one turn; every field left as None takes the server's default.

    The server validates ranges and its own limits and answers :class:`~gill_client.errors.InvalidArgument`
    naming the field.
    """

    max_new_tokens: int | None = None  # tokens to generate, >= 1 (server limit, default 1024)
    temperature: float | None = None  # >= 0; 0 is greedy (top_p must then be 1)
    top_p: float | None = None  # nucleus sampling mass in (0, 1]
    seed: int | None = None  # in [0, 2**63) for sampling and diffusion
    min_word_tokens: int | None = None  # no image during the first this many tokens
    ret_scale_factor: float | None = None  # >= 0: scales the [IMG0] logit towards showing an image
    gen_scale_factor: float | None = None
    max_images: int | None = None  # images per turn, >= 0 (server limit, default 8)
    guidance_scale: float | None = None  # classifier-free guidance of generation, in [0, 50]
    num_inference_steps: int | None = None  # denoising steps, >= 1 (server limit, default 200)
    allow_retrieval: bool | None = None
    allow_generation: bool | None = None
    preview_every: int | None = None  # denoising steps between previews; 0 sends none
    scheduler: str | None = None  # "pndm" (the reference's, 50 steps) or "dpm++" (DPM-Solver++, 20-25 steps)
    # True: every text part goes to the model exactly as written, without the dialogue format's "Q: ...\nA:"
    # (user) and " ...\n" (assistant) wrapping; for evaluations that reproduce the reference's interleaved
    # prompts. A server older than the field ignores it.
    raw_text: bool | None = None

    def to_proto(self) -> pb.Options:
        """Returns the wire ``gill.v1.Options`` with exactly the fields that are not None set."""
        options = pb.Options()
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None:
                setattr(options, item.name, value)
        return options

    def merged(self, other: ChatOptions | None) -> ChatOptions:
        """Returns these options with every field that ``other`` sets taking ``other``'s value."""
        if other is None:
            return self
        changes = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                   if getattr(other, f.name) is not None}
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a turn that failed with UNAVAILABLE before its first event (never after: text already
    streamed would be repeated). The first retry waits ``initial_backoff_s``, each next one ``multiplier``
    times longer, at most ``max_backoff_s``; all within the call's deadline."""

    attempts: int = 4  # tries in all, the first included; 1 disables retries
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1 (1 disables retries), got {self.attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, retry: int) -> float:
        """Returns the seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1)))
