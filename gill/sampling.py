"""GILL's logit rules for ``[IMG]`` tokens and the per-turn chain of logits processors."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from gill.options import GenerationOptions


def image_rule(scores: torch.Tensor, img_ids: tuple[int, ...], blocked: torch.Tensor, ret_scale: torch.Tensor,
               gen_scale: torch.Tensor) -> torch.Tensor:
    """The reference's ``[IMG]`` logit rules on ``[B, V]`` scores, each row with its own settings (``[B]`` tensors
    on the scores' device), applied before temperature and top-p; returns new scores.

    ``[IMG1..7]`` are never sampled (they are forced after ``[IMG0]``); ``[IMG0]`` is forbidden in ``blocked``
    rows (within the first ``min_word_tokens`` steps, or out of image budget); otherwise a scale factor above 1
    sets its logit to ``|logit| * factor`` (retrieval factor first, then generation factor, as the reference).
    """
    img0, forced = img_ids[0], list(img_ids[1:])
    scores = scores.clone()
    if forced == list(range(forced[0], forced[0] + len(forced))):
        scores[:, forced[0]:forced[-1] + 1] = -float("inf")  # a slice: a list index is a copy to the device
    else:
        scores[:, forced] = -float("inf")
    img = scores[:, img0]
    for factor in (ret_scale, gen_scale):
        img = torch.where(factor > 1, img.abs() * factor, img)
    scores[:, img0] = img.masked_fill(blocked, -float("inf"))  # masked_fill: boolean indexing waits for the device
    return scores


class ImageTokenRule(LogitsProcessor):
    """:func:`image_rule` as a transformers ``LogitsProcessor`` for rows sharing ``options``; set ``step`` (and
    ``allowed_rows``, ``[B]`` bool: rows that may still start an image) before each call."""

    def __init__(self, img_ids: tuple[int, ...], options: GenerationOptions) -> None:
        self.img_ids = img_ids
        self.options = options
        self.step = 0
        self.allowed_rows: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        blocked = torch.full((rows,), self.step < self.options.min_word_tokens, device=scores.device)
        if self.allowed_rows is not None:
            blocked = blocked | ~self.allowed_rows.to(scores.device)
        ret, gen = (torch.full((rows,), factor, device=scores.device, dtype=scores.dtype)
                    for factor in (self.options.ret_scale_factor, self.options.gen_scale_factor))
        return image_rule(scores, self.img_ids, blocked, ret, gen)


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


def warpers(options: GenerationOptions) -> LogitsProcessorList:
    """What sampling applies after the ``[IMG]`` rule: stable scores, temperature and top-p (empty when greedy)."""
    chain = LogitsProcessorList()
    if options.temperature > 0:
        chain.append(StableScores())
        chain.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1:
            chain.append(TopPLogitsWarper(options.top_p))
    return chain
