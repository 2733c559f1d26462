"""Validation of a training run, as the reference's ``gill/validate.py`` measures it.

Over the first ``max_samples`` pairs of a validation set (every one when None):

- **retrieval**: text->image and image->text recall@1 and @5 among the set's own pairs. The text side is the
  objective's ``[IMG0]`` retrieval embedding of ``caption + [IMG0..7]`` (no image), the image side ``visual_fc``
  of the CLIP pooler output; both L2-normalised, so a score is a cosine.
- **caption_ce**: the captioning cross-entropy (``[visual prefix] BOS caption``, no concatenation), the mean of
  the batch means weighted by batch size.
- **generation_l2**: the generation loss against the precomputed SD targets, when the set has them.
- **bleu1 .. bleu4**: corpus BLEU of greedy captions. The prompt is the visual prefix then ``BOS "A picture of"``
  (the reference's ``--input-prompt``); up to 32 new tokens, ``[IMG]`` and ``<|image|>`` suppressed, cut at the
  first newline or EOS. References are the captions as the model trains on them (decoded from the ``max_len``
  token ids, so a long caption is truncated the same way), as the reference decodes its target tokens.

Under ``torch.distributed`` every rank scores a strided share of the samples and the results are gathered, so all
ranks return the same metrics and no rank waits idle at a barrier.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from gill.errors import InputError
from gill.evaluation.metrics import recall_at_k
from gill.training.batch import Batch
from gill.training.data import CaptionImageShards, CaptionImageTSV, Failed, Sample, collate
from gill.training.losses import l2_loss
from gill.training.objective import GILLObjective

CAPTION_PROMPT = "A picture of"  # the reference's --input-prompt
CAPTION_TOKENS = 32  # the reference's greedy caption length


@dataclass(frozen=True)
class ValidationMetrics:
    """Scores of one validation pass; recalls and BLEU in [0, 1], losses as the training objective defines them.

    samples: pairs scored (after failed ones were skipped); skipped: pairs that failed to load.
    generation_l2: None when the set has no SD targets.
    """

    samples: int
    skipped: int
    text_to_image_top1: float
    text_to_image_top5: float
    image_to_text_top1: float
    image_to_text_top5: float
    caption_ce: float
    generation_l2: float | None
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ BLEU

_WORD = re.compile(r"\w+|[^\w\s]")


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"A dog, running."`` -> ``a dog , running .``."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> list[float]:
    """Corpus BLEU-1 .. BLEU-``max_order`` of one hypothesis per reference (Papineni et al., 2002, eq. 1-2).

    BLEU-N = BP * exp(mean_{n<=N} log p_n): p_n is the corpus-level modified n-gram precision (each hypothesis
    n-gram counted at most as often as it occurs in its reference, summed over the corpus, over all hypothesis
    n-grams), BP = min(1, exp(1 - r / c)) with r and c the total reference and hypothesis lengths in tokens
    (:func:`bleu_tokens`). No smoothing: a BLEU-N is 0 when some p_n (n <= N) is 0, as NLTK's and sacrebleu's
    unsmoothed corpus BLEU. Returns ``[BLEU-1, ..., BLEU-max_order]``, each in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_order, [0] * max_order
    hypothesis_length = reference_length = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
        hypothesis_length += len(hyp)
        reference_length += len(ref)
        for n in range(1, max_order + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hypothesis_length == 0:
        return [0.0] * max_order
    brevity = 1.0 if hypothesis_length > reference_length else math.exp(1 - reference_length / hypothesis_length)
    scores, log_sum = [], 0.0
    for n in range(max_order):
        if matches[n] == 0:
            scores.extend([0.0] * (max_order - n))
            break
        log_sum += math.log(matches[n] / totals[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


# ------------------------------------------------------------------------------------------------ samples


class _Indexed(Dataset):
    """``dataset[i]`` as ``(i, sample)``, so results from several workers and ranks can be put back in order."""

    def __init__(self, dataset: CaptionImageTSV, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Sample | Failed]:
        index = self.indices[position]
        return index, self.dataset[index]


def _identity(entries: list) -> list:
    return entries


def validation_entries(dataset: CaptionImageTSV | CaptionImageShards, max_samples: int | None, batch_size: int,
                       rank: int = 0, world_size: int = 1,
                       num_workers: int = 0) -> Iterator[list[tuple[int, Sample | Failed]]]:
    """This rank's share (indices ``rank::world_size``) of the first ``max_samples`` entries, ``batch_size`` at a time.

    A TSV is read through a DataLoader with ``num_workers`` (its fixed generator leaves the global RNG alone, so
    validating mid-run does not change training); shards are read in order in this process.
    """
    if isinstance(dataset, CaptionImageTSV):
        count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        indexed = _Indexed(dataset, range(rank, count, world_size))
        yield from DataLoader(indexed, batch_size=batch_size, num_workers=num_workers, collate_fn=_identity,
                              generator=torch.Generator().manual_seed(0))
        return
    stream = enumerate(dataset.stream(dataset.shards))
    if max_samples is not None:
        stream = itertools.islice(stream, max_samples)
    mine = ((index, entry) for index, entry in stream if index % world_size == rank)
    while chunk := list(itertools.islice(mine, batch_size)):
        yield chunk


# ------------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def greedy_captions(objective: GILLObjective, prefix: torch.Tensor, prompt_ids: torch.Tensor,
                    tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = CAPTION_TOKENS) -> list[str]:
    """Greedy captions of ``[B, n_visual_tokens, D]`` visual prefixes followed by ``prompt_ids`` ``[P]`` (BOS first).

    transformers' ``generate`` decodes from ``inputs_embeds`` with its KV cache; ``[IMG]`` and ``<|image|>`` are
    suppressed (a caption never asks for an image) and decoding stops at EOS or a newline.
    """
    tokens = objective.tokens
    lm = objective.lm
    prompt = objective.embed_tokens(prompt_ids.to(objective.device)[None]).expand(prefix.shape[0], -1, -1)
    embeddings = torch.cat([prefix.to(prompt.dtype), prompt], dim=1).to(objective.frozen_dtype)
    mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
    output = lm.generate(inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, eos_token_id=[tokens.eos, tokens.newline],
                         pad_token_id=tokens.pad, suppress_tokens=[*tokens.img, tokens.image])
    captions = []
    for row in output.tolist():  # generate returns only the new tokens when given inputs_embeds alone
        cut = next((i for i, token in enumerate(row) if token in (tokens.eos, tokens.newline, tokens.pad)), len(row))
        captions.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return captions


def reference_captions(objective: GILLObjective, batch: Batch, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The captions of ``batch`` as trained on: its caption token ids (no BOS, no ``[IMG]``, no padding), decoded."""
    lengths = objective.caption_lengths(batch.input_ids, batch.attention_mask).tolist()
    return [tokenizer.decode(ids[1:length], skip_special_tokens=True).strip()
            for ids, length in zip(batch.input_ids.tolist(), lengths, strict=True)]


@dataclass
class _Scores:
    """One rank's per-sample results, in the order its samples were scored."""

    indices: list[int]
    text: list[np.ndarray]  # [b, ret_emb_dim] float32, unit rows (NumPy: all_gather_object pickles it plainly)
    image: list[np.ndarray]
    caption_ce: list[tuple[float, int]]  # (batch mean, batch size)
    generation_l2: list[tuple[float, int]]
    hypotheses: list[str]
    references: list[str]
    skipped: int = 0


def _views(objective: GILLObjective, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP pooled outputs ``[B, vision_width]`` and the ``[IMG0..7]`` states ``[B, 8, lm_width]`` of
    ``caption + [IMG0..7]`` (no image); call under the objective's autocast."""
    pooled = objective.encode_images(batch.pixel_values)
    _, states = objective.text_view(batch.input_ids, batch.attention_mask)
    return pooled, states


def _retrieval_rows(objective: GILLObjective, pooled: torch.Tensor, states: torch.Tensor
                    ) -> tuple[np.ndarray, np.ndarray]:
    adapters = objective.adapters
    return (adapters.text_retrieval_embedding(states).float().cpu().numpy(),
            adapters.image_retrieval_embedding(pooled).float().cpu().numpy())


@torch.no_grad()
def retrieval_embeddings(objective: GILLObjective, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The text-side and image-side retrieval vectors of a batch of pairs, ``[B, ret_emb_dim]`` float32 unit rows
    each: the ``[IMG0]`` state of ``caption + [IMG0..7]`` through ``ret_text_hidden_fcs``, and ``visual_fc`` of the
    CLIP pooled output. What validation scores retrieval with; ``batch`` must be on the objective's device."""
    with torch.autocast(objective.device.type, dtype=torch.bfloat16, enabled=objective.uses_autocast):
        return _retrieval_rows(objective, *_views(objective, batch))


def retrieval_recalls(text: np.ndarray, image: np.ndarray, ks: Sequence[int] = (1, 5), chunk: int = 2048
                      ) -> tuple[dict[int, float], dict[int, float]]:
    """Text->image and image->text recall@k (in [0, 1]) among ``N`` pairs: row ``i`` of ``text`` ``[N, d]`` and
    of ``image`` ``[N, d]`` (unit rows) belong together; every other row of the set is a distractor.

    Scored ``chunk`` queries at a time, so a whole CC3M val set (about 13k pairs) never holds an ``N x N`` matrix;
    the result does not depend on ``chunk``."""
    if text.shape != image.shape or text.ndim != 2:
        raise InputError(f"text {text.shape} and image {image.shape} embeddings must both be [N, d]")

    def recalls(queries: np.ndarray, candidates: np.ndarray) -> dict[int, float]:
        hits = dict.fromkeys(ks, 0)
        for start in range(0, len(queries), chunk):
            block = queries[start:start + chunk]
            found = recall_at_k(block @ candidates.T, np.arange(start, start + len(block)), ks=ks)
            for k in ks:
                hits[k] += round(found[k] * len(block))
        return {k: hits[k] / len(queries) for k in ks}

    return recalls(text, image), recalls(image, text)


def _score_batch(objective: GILLObjective, batch: Batch, prompt_ids: torch.Tensor,
                 tokenizer: PreTrainedTokenizerBase, scores: _Scores) -> None:
    adapters = objective.adapters
    with torch.autocast(objective.device.type, dtype=torch.bfloat16, enabled=objective.uses_autocast):
        pooled, states = _views(objective, batch)
        text, image = _retrieval_rows(objective, pooled, states)
        scores.text.append(text)
        scores.image.append(image)
        prefix = adapters.visual_prefix(pooled)
        caption_ce = objective.caption_loss(prefix, batch.input_ids, batch.attention_mask, concat=False)
        scores.caption_ce.append((float(caption_ce), len(batch)))
        if batch.sd_targets is not None:
            l2 = l2_loss(objective.prompt_embeddings(states), batch.sd_targets)
            scores.generation_l2.append((float(l2), len(batch)))
    scores.hypotheses.extend(greedy_captions(objective, prefix, prompt_ids, tokenizer))
    scores.references.extend(reference_captions(objective, batch, tokenizer))


def _gathered(scores: _Scores) -> list[_Scores]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [scores]
    everyone: list[_Scores | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, scores)
    return [s for s in everyone if s is not None]


def _weighted_mean(pairs: Sequence[tuple[float, int]]) -> float | None:
    total = sum(count for _, count in pairs)
    return sum(value * count for value, count in pairs) / total if total else None


@torch.no_grad()
def validate(objective: GILLObjective, dataset: CaptionImageTSV | CaptionImageShards,
             tokenizer: PreTrainedTokenizerBase, *, max_samples: int | None = None, batch_size: int = 32,
             num_workers: int = 0, rank: int = 0, world_size: int = 1) -> ValidationMetrics:
    """Score ``objective`` on ``dataset`` (see the module docstring); the objective is left in the mode it was in.

    Every rank of a ``torch.distributed`` group must call this with the same arguments but its own ``rank``.
    Raises :class:`~gill.errors.InputError` when no sample of the set could be scored.
    """
    was_training = objective.training
    objective.eval()
    prompt_ids = tokenizer(CAPTION_PROMPT, add_special_tokens=True, return_tensors="pt").input_ids[0]
    scores = _Scores([], [], [], [], [], [], [])
    try:
        for entries in validation_entries(dataset, max_samples, batch_size, rank, world_size, num_workers):
            good = [(index, entry) for index, entry in entries if isinstance(entry, Sample)]
            scores.skipped += len(entries) - len(good)
            batch = collate([entry for _, entry in good])
            if batch is None:
                continue
            scores.indices.extend(index for index, _ in good)
            _score_batch(objective, batch.to(objective.device), prompt_ids, tokenizer, scores)
    finally:
        objective.train(was_training)
    return _summarise(_gathered(scores))


def _summarise(parts: list[_Scores]) -> ValidationMetrics:
    indices = [i for part in parts for i in part.indices]
    if not indices:
        raise InputError("no validation sample could be scored: every one failed to load; check the validation "
                         "data (the skipped samples are logged at debug level with their reason)")
    order = np.argsort(indices, kind="stable")
    text = np.concatenate([t for part in parts for t in part.text])[order]
    image = np.concatenate([t for part in parts for t in part.image])[order]
    text_to_image, image_to_text = retrieval_recalls(text, image, ks=(1, 5))
    hypotheses = [h for part in parts for h in part.hypotheses]
    references = [r for part in parts for r in part.references]
    bleu = corpus_bleu([hypotheses[i] for i in order], [references[i] for i in order])
    return ValidationMetrics(
        samples=len(indices), skipped=sum(part.skipped for part in parts),
        text_to_image_top1=text_to_image[1], text_to_image_top5=text_to_image[5],
        image_to_text_top1=image_to_text[1], image_to_text_top5=image_to_text[5],
        caption_ce=_weighted_mean([pair for part in parts for pair in part.caption_ce]) or 0.0,
        generation_l2=_weighted_mean([pair for part in parts for pair in part.generation_l2]),
        bleu1=bleu[0], bleu2=bleu[1], bleu3=bleu[2], bleu4=bleu[3])
