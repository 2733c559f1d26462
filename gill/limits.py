"""What one request may ask of a server: sizes and budgets, configurable per deployment.

The served ``gill`` model reads each limit from its config parameter ``limit_<name>``
(``model_repository/gill/config.pbtxt``; ``gill serve --limit NAME=VALUE`` sets it); ``gill run`` uses the
defaults. A request over a limit gets an :class:`~gill.errors.InputError` (``INVALID_ARGUMENT`` on the wire)
that names the limit and says it is this server's. Values that make no sense anywhere (NaN, negative, zero
tokens) are :class:`~gill.options.GenerationOptions`' own checks, not limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from gill.errors import ConfigError, InputError
from gill.options import GenerationOptions

PARAMETER_PREFIX = "limit_"


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one request; the defaults keep one request from monopolising a server.

    Raise them deliberately, not by accident: each costs memory or time per request. Request sizes are
    checked before any image is decoded or any text is tokenized.
    """

    # Serialized ChatRequest. Below the gRPC caps (Triton accepts 2 GiB, gill_client sends up to 256 MiB), so
    # this check, not the transport, is what a client meets; 16 full-size photos fit.
    max_request_bytes: int = 64 * 1024 * 1024
    max_messages: int = 64  # messages in the conversation
    max_parts: int = 256  # text and image parts over all messages
    max_images_per_request: int = 16  # image parts over all messages (each is a CLIP forward)
    # Characters of text over all messages. OPT's window (2048 tokens) holds far fewer; this bounds the
    # tokenizer's work before the context-length check rejects the prompt.
    max_text_chars: int = 100_000
    max_new_tokens: int = 1024  # Options.max_new_tokens
    max_images: int = 8  # Options.max_images: images shown in one turn (each a retrieval or a diffusion run)
    max_denoising_steps: int = 200  # Options.num_inference_steps

    def __post_init__(self) -> None:
        for field in fields(self):
            value, minimum = getattr(self, field.name), _MINIMUM.get(field.name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"limit {field.name}={value!r} (allowed: an integer >= {minimum})")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Limits:
        """The limits in a model config's ``parameters`` (``limit_<name>``: a decimal integer; empty or absent:
        the default). Other parameters are ignored; an unknown ``limit_`` key raises :class:`ConfigError`."""
        values = {key.removeprefix(PARAMETER_PREFIX): value for key, value in parameters.items()
                  if key.startswith(PARAMETER_PREFIX) and value.strip()}
        return cls.from_strings(values, source="model config parameter " + PARAMETER_PREFIX)

    @classmethod
    def from_assignments(cls, assignments: Iterable[str]) -> Limits:
        """The limits of ``NAME=VALUE`` strings (``gill serve --limit``); the last of a repeated name wins."""
        values = {}
        for assignment in assignments:
            name, equals, value = assignment.partition("=")
            if not equals:
                raise ConfigError(f"--limit {assignment!r}: expected NAME=VALUE, for example max_new_tokens=256 "
                                  f"(names: {', '.join(names())})")
            values[name.strip()] = value
        return cls.from_strings(values, source="--limit ")

    @classmethod
    def from_strings(cls, values: Mapping[str, str], source: str = "") -> Limits:
        known = names()
        overrides = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"{source}{name}: no such limit (known: {', '.join(known)})")
            try:
                overrides[name] = int(value.strip())  # 4_194_304 reads as Python reads it
            except ValueError:
                raise ConfigError(f"{source}{name}={value!r}: not an integer") from None
        return cls(**overrides)

    def to_parameters(self) -> dict[str, str]:
        """Every limit as the ``gill`` model's config parameters (``limit_<name>``: decimal string)."""
        return {PARAMETER_PREFIX + field.name: str(getattr(self, field.name)) for field in fields(self)}

    def model_parameters(self) -> dict[str, dict[str, str]]:
        """The config parameters of each model that enforces limits: ``gill`` all of them, ``diffusion`` its
        step budget (the ``text_to_image`` ensemble, or a client holding the key, calls it directly)."""
        every = self.to_parameters()
        return {"gill": every, "diffusion": {key: every[key] for key in ("limit_max_denoising_steps",)}}

    def check(self, name: str, value: int, what: str, hint: str = "") -> None:
        """Raise :class:`InputError` when ``value`` is over limit ``name``; ``what`` describes the request
        (``"request has 70 messages"``) and ``hint`` says what to do instead."""
        limit = getattr(self, name)
        if value > limit:
            raise InputError(f"{what}; this server allows at most {limit} (limit {name}"
                             + (f"; {hint})" if hint else ")"))

    def check_options(self, options: GenerationOptions) -> None:
        """Raise :class:`InputError` naming every option over this server's limits."""
        problems = [f"{option}={getattr(options, option)} (this server allows at most {getattr(self, limit)}, "
                    f"limit {limit})"
                    for option, limit in _OPTION_LIMITS.items() if getattr(options, option) > getattr(self, limit)]
        if problems:
            raise InputError("options over this server's limits: " + "; ".join(problems))

    def cap(self, options: GenerationOptions) -> GenerationOptions:
        """``options`` with each limited value lowered to its limit: a server whose limit is below a default
        (say max_denoising_steps=20 against the default 50 steps) uses its limit for requests that leave the
        option unset."""
        capped = {option: min(getattr(options, option), getattr(self, limit))
                  for option, limit in _OPTION_LIMITS.items()}
        return dataclasses.replace(options, **capped)


def names() -> list[str]:
    """The limits' names, in declaration order."""
    return [field.name for field in fields(Limits)]


# A limit of 0 images turns images off; every other limit must allow at least one.
_MINIMUM = {"max_images": 0, "max_images_per_request": 0}
# GenerationOptions field -> the limit on it
_OPTION_LIMITS = {"max_new_tokens": "max_new_tokens", "max_images": "max_images",
                  "num_inference_steps": "max_denoising_steps"}
