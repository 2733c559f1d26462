"""KV-cached decoding over prompt embeddings, with GILL's ``[IMG]`` rules.

The reference re-runs the whole sequence through the LM at every step (no cache) and appends all 8
``[IMG]`` ids when ``[IMG0]`` is sampled, reading their states only on the next full pass. Here:

- the prompt is prefilled once and every step feeds only new tokens through a ``DynamicCache``;
- when a row samples ``[IMG0]``, the next forward feeds ``[IMG0..7]`` for that row as one 8-token chunk
  (a prefill); its output gives the 8 last-layer states and the logits for the text after the image;
  other rows in the batch feed their one token plus 7 masked pad slots in the same forward;
- rows stop at EOS, at a newline (the reference cuts its output there), or at the token budget;
- ``cancel()`` is checked before every forward, so a cancelled request stops within one step.

The batch mechanics (rows with their own options joining and leaving between steps) live in
:mod:`gill.batching`; :meth:`Decoder.stream` runs one batch to the end. Logit rules and sampling
(:mod:`gill.sampling`) use transformers' ``LogitsProcessor`` classes. :func:`generate_without_cache` keeps
the reference's full-recompute method as the baseline for parity tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from gill.batching import CancelCheck, DecodeBatch, Emit, Row, RowEvent, RowImage, RowToken
from gill.errors import InputError
from gill.options import GenerationOptions
from gill.sampling import ImageTokenRule, StableScores  # noqa: F401 - re-exported: the rules decoding applies
from gill.tokens import SpecialTokens


@dataclass
class TokenStep:
    """One sampled token per row (None for rows that had already finished), yielded before the next forward."""

    tokens: list[int | None]
    finished: list[str | None]


@dataclass
class ImageStates:
    """The ``[IMG]`` chunk of some rows went through the LM: row -> ``[8, lm_width]`` last-layer states."""

    states: dict[int, torch.Tensor] = field(default_factory=dict)


def check_context(prompt_length: int, options: GenerationOptions, num_tokens: int, max_positions: int) -> None:
    """Raise :class:`InputError` when the prompt plus the worst-case output would overflow the LM's window."""
    needed = prompt_length + options.max_new_tokens + (num_tokens - 1) * options.max_images
    if needed > max_positions:
        raise InputError(
            f"context too long: the prompt is {prompt_length} tokens and up to {options.max_new_tokens} new tokens "
            f"and {options.max_images} image(s) of {num_tokens} tokens may follow ({needed} positions), but the "
            f"model's window is {max_positions}; shorten the conversation or lower max_new_tokens/max_images")


class Decoder:
    """Batched, KV-cached decoding over an OPT-style causal LM fed with ``inputs_embeds``."""

    def __init__(self, lm: PreTrainedModel, tokens: SpecialTokens) -> None:
        self.lm = lm
        self.tokens = tokens
        self.max_positions = lm.config.max_position_embeddings

    @property
    def _body(self) -> torch.nn.Module:
        return self.lm.get_decoder()

    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """``[B, T, D]`` embeddings -> ``[B, T, D]`` last-layer states (after the final layer norm)."""
        output = self._body(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True)
        return output.last_hidden_state

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(states).float()

    def image_states(self, prompt: torch.Tensor) -> torch.Tensor:
        """``[T, D]`` prompt -> ``[8, D]`` states of ``[IMG0..7]`` placed right after it.

        The fixed text-to-image path (the reference's evaluation recipe forces ``[IMG0]`` at once): one
        forward, no sampling.
        """
        if prompt.ndim != 2 or prompt.shape[0] == 0:
            raise InputError("the prompt must be a non-empty [T, D] tensor of embeddings")
        embedding = self.lm.get_input_embeddings()
        img = embedding(torch.tensor(self.tokens.img, device=embedding.weight.device))
        if prompt.shape[0] + img.shape[0] > self.max_positions:
            raise InputError(f"context too long: {prompt.shape[0]} prompt tokens + {img.shape[0]} [IMG] tokens "
                             f"exceed the model's window of {self.max_positions}")
        sequence = torch.cat([prompt.to(img.device, img.dtype), img])[None]
        with torch.inference_mode():
            return self._body(inputs_embeds=sequence, use_cache=False).last_hidden_state[0, -img.shape[0]:]

    def check_prompt(self, prompt: torch.Tensor, options: GenerationOptions) -> None:
        """Raise :class:`InputError` unless ``prompt`` is a ``[T, D]`` tensor whose turn fits the LM's window."""
        if prompt.ndim != 2 or prompt.shape[0] == 0:
            raise InputError("each prompt must be a non-empty [T, D] tensor of embeddings")
        check_context(prompt.shape[0], options, len(self.tokens.img), self.max_positions)

    def stream(self, prompts: list[torch.Tensor], options: GenerationOptions,
               cancel: CancelCheck | None = None) -> Iterator[TokenStep | ImageStates]:
        """Decode ``prompts`` (each ``[T_i, D]`` embeddings) together; yields steps as they happen.

        The last :class:`TokenStep` has every row finished; ``finished[row]`` is ``eos``, ``newline``,
        ``length`` or ``cancelled``. Each row samples with its own generator (seeded with ``options.seed``),
        so a row's tokens do not depend on the rows beside it.
        """
        if not prompts:
            raise InputError("no prompts to decode")
        for prompt in prompts:
            self.check_prompt(prompt, options)
        if cancel is not None and cancel():
            yield TokenStep([None] * len(prompts), ["cancelled"] * len(prompts))
            return
        tokens: list[int | None] = [None] * len(prompts)
        finished: list[str | None] = [None] * len(prompts)
        images: dict[int, torch.Tensor] = {}

        def collect(row: int) -> Emit:
            def emit(event: RowEvent) -> None:
                if isinstance(event, RowToken):
                    tokens[row], finished[row] = event.token, event.finished
                elif isinstance(event, RowImage):
                    images[row] = event.states
            return emit

        batch = DecodeBatch(self)
        batch.add(prompts, [Row(self, options, collect(row), cancel) for row in range(len(prompts))])
        while batch.rows:
            tokens[:] = [None] * len(prompts)
            batch.sample()
            yield TokenStep(list(tokens), list(finished))
            batch.advance()
            if images:
                yield ImageStates(dict(images))
                images.clear()


def generate_without_cache(lm: PreTrainedModel, tokens: SpecialTokens, prompt: torch.Tensor,
                           options: GenerationOptions) -> tuple[list[int], list[torch.Tensor]]:
    """The reference's method, greedy: a full forward over the whole sequence at every step, no cache.

    Returns the generated ids (with the 8 ``[IMG]`` ids after each ``[IMG0]``) and the ``[8, D]`` states of
    each image. Kept only as the baseline that :class:`Decoder` is tested and benchmarked against.
    """
    if options.temperature != 0:
        raise InputError("generate_without_cache is greedy only")
    embedding = lm.get_input_embeddings()
    sequence = prompt.to(embedding.weight.dtype)[None]
    rule = ImageTokenRule(tokens.img, options)
    generated: list[int] = []
    images: list[torch.Tensor] = []
    pending_image = False
    def full_pass(sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As the reference: the whole LM over the whole sequence, logits and every layer's states kept.
        output = lm(inputs_embeds=sequence, use_cache=False, output_hidden_states=True)
        return output.logits[0, -1:].float(), output.hidden_states[-1][0]

    with torch.inference_mode():
        for step in range(options.max_new_tokens):
            logits, states = full_pass(sequence)
            if pending_image:
                images.append(states[-len(tokens.img):].clone())
                pending_image = False
            rule.step = step
            rule.allowed_rows = torch.tensor([len(images) < options.max_images])
            token = int(rule(torch.zeros(1, 0, dtype=torch.long), logits).argmax(dim=-1))
            if (options.stop_at_eos and token == tokens.eos) or (options.stop_at_newline and token == tokens.newline):
                generated.append(token)
                break
            new_ids = list(tokens.img) if token == tokens.img[0] else [token]
            pending_image = token == tokens.img[0]
            generated.extend(new_ids)
            sequence = torch.cat([sequence, embedding(torch.tensor([new_ids], device=sequence.device))], dim=1)
        if pending_image:  # the image's states exist only after one more pass, as in the reference
            images.append(full_pass(sequence)[1][-len(tokens.img):])
    return generated, images
