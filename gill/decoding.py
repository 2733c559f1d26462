"""KV-cached decoding over prompt embeddings, with GILL's ``[IMG]`` rules.

The reference re-runs the whole sequence through the LM at every step (no cache) and appends all 8
``[IMG]`` ids when ``[IMG0]`` is sampled, reading their states only on the next full pass. Here:

- the prompt is prefilled once and every step feeds only new tokens through a ``DynamicCache``;
- when a row samples ``[IMG0]``, the next forward feeds ``[IMG0..7]`` for that row as one 8-token chunk
  (a prefill); its output gives the 8 last-layer states and the logits for the text after the image;
  other rows in the batch feed their one token plus 7 masked pad slots in the same forward;
- rows stop at EOS, at a newline (the reference cuts its output there), or at the token budget;
- ``cancel()`` is checked before every forward, so a cancelled request stops within one step.

Logit rules and sampling use transformers' ``LogitsProcessor`` classes. :func:`generate_without_cache`
keeps the reference's full-recompute method as the baseline for parity tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from gill.errors import InputError
from gill.options import GenerationOptions
from gill.tokens import SpecialTokens

CancelCheck = Callable[[], bool]


class ImageTokenRule(LogitsProcessor):
    """The reference's ``[IMG]`` logit rules, applied before temperature and top-p.

    ``[IMG1..7]`` are never sampled (they are forced after ``[IMG0]``); ``[IMG0]`` is forbidden during the
    first ``min_word_tokens`` steps and for rows out of image budget; otherwise a scale factor above 1 sets
    its logit to ``|logit| * factor`` (retrieval factor first, then generation factor, as the reference).
    """

    def __init__(self, img_ids: tuple[int, ...], options: GenerationOptions) -> None:
        self.img0 = img_ids[0]
        self.forced = list(img_ids[1:])
        self.options = options
        self.step = 0
        self.allowed_rows: torch.Tensor | None = None  # [B] bool: rows that may still start an image

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.forced] = -float("inf")
        if self.step < self.options.min_word_tokens:
            scores[:, self.img0] = -float("inf")
            return scores
        for factor in (self.options.ret_scale_factor, self.options.gen_scale_factor):
            if factor > 1:
                scores[:, self.img0] = scores[:, self.img0].abs() * factor
        if self.allowed_rows is not None:
            scores[~self.allowed_rows, self.img0] = -float("inf")
        return scores


class StableScores(LogitsProcessor):
    """Shift each row so its largest score is 0 (softmax and the top-p set do not change), before temperature.

    Without it a tiny temperature (``1e-45``) divides scores into several ``+inf``, and a huge scale factor
    makes the ``[IMG0]`` score ``+inf``; softmax then computes ``inf - inf = nan`` and sampling fails. A row
    with ``+inf`` scores keeps only those (the limit the overflow stood for); after the shift a tiny
    temperature tends to greedy decoding, as it should.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top = torch.isposinf(scores)
        scores = torch.where(top.any(dim=-1, keepdim=True), torch.where(top, 0.0, -float("inf")), scores)
        return scores - scores.max(dim=-1, keepdim=True).values


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

    def stream(self, prompts: list[torch.Tensor], options: GenerationOptions,
               cancel: CancelCheck | None = None) -> Iterator[TokenStep | ImageStates]:
        """Decode ``prompts`` (each ``[T_i, D]`` embeddings) together; yields steps as they happen.

        The last :class:`TokenStep` has every row finished; ``finished[row]`` is ``eos``, ``newline``,
        ``length`` or ``cancelled``.
        """
        if not prompts:
            raise InputError("no prompts to decode")
        for prompt in prompts:
            if prompt.ndim != 2 or prompt.shape[0] == 0:
                raise InputError("each prompt must be a non-empty [T, D] tensor of embeddings")
            check_context(prompt.shape[0], options, len(self.tokens.img), self.max_positions)
        embedding = self.lm.get_input_embeddings()
        device, dtype = embedding.weight.device, embedding.weight.dtype
        batch = len(prompts)
        width = max(p.shape[0] for p in prompts)
        embeds = torch.zeros(batch, width, prompts[0].shape[1], device=device, dtype=dtype)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token sits at the end
            embeds[row, width - prompt.shape[0]:] = prompt.to(device=device, dtype=dtype)
            mask[row, width - prompt.shape[0]:] = 1

        img_ids = torch.tensor(self.tokens.img, device=device)
        rule = ImageTokenRule(self.tokens.img, options)
        processors = LogitsProcessorList([rule])
        if options.temperature > 0:
            processors.append(StableScores())
            processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_p < 1:
                processors.append(TopPLogitsWarper(options.top_p))
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed)
        images_used = [0] * batch
        finished: list[str | None] = [None] * batch
        history = torch.zeros(batch, 0, dtype=torch.long, device=device)

        cache = DynamicCache(config=self.lm.config)
        if cancel is not None and cancel():
            yield TokenStep([None] * batch, ["cancelled"] * batch)
            return
        with torch.inference_mode():
            logits = self._logits(self._forward(embeds, mask, cache)[:, -1])
            for step in range(options.max_new_tokens):
                rule.step = step
                rule.allowed_rows = torch.tensor([used < options.max_images for used in images_used], device=device)
                scores = processors(history, logits)
                if options.temperature > 0:
                    probabilities = torch.softmax(scores, dim=-1)
                    sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
                else:
                    sampled = scores.argmax(dim=-1)
                history = torch.cat([history, sampled[:, None]], dim=1)

                tokens: list[int | None] = []
                image_rows = []
                for row in range(batch):
                    if finished[row] is not None:
                        tokens.append(None)
                        continue
                    token = int(sampled[row])
                    tokens.append(token)
                    if token == self.tokens.img[0]:
                        image_rows.append(row)
                        images_used[row] += 1
                    elif options.stop_at_eos and token == self.tokens.eos:
                        finished[row] = "eos"
                    elif options.stop_at_newline and token == self.tokens.newline:
                        finished[row] = "newline"
                last_step = step == options.max_new_tokens - 1
                if last_step:
                    finished = [reason or "length" for reason in finished]
                live = any(reason is None for reason in finished)
                if (live or image_rows) and cancel is not None and cancel():
                    yield TokenStep(tokens, [reason or "cancelled" for reason in finished])
                    return
                yield TokenStep(tokens, list(finished))
                if not live and not image_rows:
                    return

                # Next chunk: the [IMG] prefill for image rows, one token for the others, masked pads elsewhere.
                chunk = len(img_ids) if image_rows else 1
                ids = torch.full((batch, chunk), self.tokens.pad, dtype=torch.long, device=device)
                chunk_mask = torch.zeros(batch, chunk, dtype=torch.long, device=device)
                for row, token in enumerate(tokens):
                    if row in image_rows:
                        ids[row] = img_ids
                        chunk_mask[row] = 1
                    elif token is not None and finished[row] is None:
                        ids[row, 0] = token
                        chunk_mask[row, 0] = 1
                mask = torch.cat([mask, chunk_mask], dim=1)
                states = self._forward(embedding(ids), mask, cache)
                if image_rows:
                    yield ImageStates({row: states[row].clone() for row in image_rows})
                if not live:
                    return
                last = torch.tensor([chunk - 1 if row in image_rows else 0 for row in range(batch)], device=device)
                logits = self._logits(states[torch.arange(batch, device=device), last])


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
