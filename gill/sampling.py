"""GILL's logit rules for ``[IMG]`` tokens and the per-turn chain of logits processors."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from gill.options import GenerationOptions


class ImageTokenRule(LogitsProcessor):
    """The reference's ``[IMG]`` logit rules, applied before temperature and top-p.

    ``[IMG1..7]`` are never sampled (they are forced after ``[IMG0]``); ``[IMG0]`` is forbidden during the
    first ``min_word_tokens`` steps and for rows out of image budget; otherwise a scale factor above 1 sets
    its logit to ``|logit| * factor`` (retrieval factor first, then generation factor, as the reference).
    """

    def __init__(self, img_ids: tuple[int, ...], options: GenerationOptions) -> None:
        self.img0 = img_ids[0]
        forced = list(img_ids[1:])
        contiguous = forced == list(range(forced[0], forced[0] + len(forced))) if forced else False
        # A slice when the ids follow each other (GILL's do): indexing with a list copies it to the device per call.
        self.forced: slice | list[int] = slice(forced[0], forced[-1] + 1) if contiguous else forced
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
        if self.allowed_rows is not None:  # masked_fill, not boolean indexing: that waits for the device
            scores[:, self.img0] = scores[:, self.img0].masked_fill(~self.allowed_rows, -float("inf"))
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


def processors(rule: ImageTokenRule, options: GenerationOptions) -> LogitsProcessorList:
    """``rule`` first, then (when sampling) stable scores, temperature and top-p, as transformers applies them."""
    chain = LogitsProcessorList([rule])
    if options.temperature > 0:
        chain.append(StableScores())
        chain.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1:
            chain.append(TopPLogitsWarper(options.top_p))
    return chain
