"""CC3M validation retrieval: text->image (and image->text) recall@1/5/10 among the set's own pairs.

The reference measures this while training (``gill/validate.py``: top-1/top-5 over the whole val set, the best
checkpoint chosen on text->image top-1) and ships no standalone script; the paper reports no CC3M recall. This
scores a checkpoint exactly as our training validation does, by reusing its code
(:func:`gill.training.validation.retrieval_embeddings` and :func:`~gill.training.validation.retrieval_recalls`):

- a caption is embedded as ``BOS caption [IMG0..7]`` (tokenised to ``max_len=32`` as in training, no image),
  the ``[IMG0]`` state through ``ret_text_hidden_fcs``, L2-normalised;
- an image by the CLIP vision tower's own preprocessing (as in training), ``visual_fc`` on the pooled output,
  L2-normalised;
- every caption is ranked against every image that loaded (and the other way round); a pair whose image is
  missing or unreadable, or whose caption is empty, is dropped and counted with its reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gill.errors import InputError

KS = (1, 5, 10)


@dataclass(frozen=True)
class Cc3mSettings:
    max_pairs: int | None = None  # the first N rows of the TSV (failed ones included); None: all
    batch_size: int = 32  # pairs per forward
    num_workers: int = 0  # DataLoader workers decoding images

    def __post_init__(self) -> None:
        if self.max_pairs is not None and self.max_pairs < 1:
            raise InputError(f"max_pairs={self.max_pairs}: give at least 1, or None for all")
        if self.batch_size < 1 or self.num_workers < 0:
            raise InputError(f"batch_size={self.batch_size}, num_workers={self.num_workers}: need batch_size >= 1 "
                             "and num_workers >= 0")


def evaluate_cc3m_retrieval(objective, dataset, settings: Cc3mSettings = Cc3mSettings(),
                            progress: bool = True) -> dict[str, Any]:
    """Recall@1/5/10 in percent both ways; returns ``settings``, ``results``, ``counts`` and ``failed`` (each
    dropped pair's key, reason and detail). ``objective`` is a :class:`~gill.training.objective.GILLObjective`,
    ``dataset`` a :class:`~gill.training.data.CaptionImageTSV`. Raises :class:`InputError` when no pair loads."""
    import torch
    from tqdm import tqdm

    from gill.training.data import Failed, Sample, collate
    from gill.training.validation import retrieval_embeddings, retrieval_recalls, validation_entries

    total = len(dataset) if settings.max_pairs is None else min(settings.max_pairs, len(dataset))
    texts, images, failed = [], [], []
    was_training = objective.training
    objective.eval()
    try:
        with tqdm(total=total, desc="CC3M pairs", unit="pair", disable=not progress) as bar:
            for entries in validation_entries(dataset, settings.max_pairs, settings.batch_size,
                                              num_workers=settings.num_workers):
                good = [entry for _, entry in entries if isinstance(entry, Sample)]
                failed += [{"key": entry.key, "reason": entry.reason, "detail": entry.detail}
                           for _, entry in entries if isinstance(entry, Failed)]
                batch = collate(good)
                if batch is not None:
                    with torch.inference_mode():
                        text, image = retrieval_embeddings(objective, batch.to(objective.device))
                    texts.append(text)
                    images.append(image)
                bar.update(len(entries))
    finally:
        objective.train(was_training)
    if not texts:
        reasons = Counter(entry["reason"] for entry in failed)
        raise InputError(f"no pair of the {total} rows could be scored ({dict(reasons)}); check --images: the TSV's "
                         "'image' paths are relative to it")
    text, image = np.concatenate(texts), np.concatenate(images)
    text_to_image, image_to_text = retrieval_recalls(text, image, KS)
    reasons = Counter(entry["reason"] for entry in failed)
    return {
        "settings": asdict(settings),
        "results": {"text_to_image": {f"r@{k}": 100 * text_to_image[k] for k in KS},
                    "image_to_text": {f"r@{k}": 100 * image_to_text[k] for k in KS},
                    "chance": {f"r@{k}": 100 * min(k, len(text)) / len(text) for k in KS}},
        "counts": {"rows": len(dataset), "considered": total, "scored": len(text), "failed": len(failed),
                   "failed_by_reason": dict(sorted(reasons.items()))},
        "failed": failed,
    }


def cc3m_markdown(result: dict[str, Any]) -> str:
    """The recall table (ours, with chance beside it; the paper reports no CC3M recall) and the counts."""
    results, counts = result["results"], result["counts"]
    lines = [f"# CC3M validation retrieval ({result['dataset']['path']})", "",
             f"Checkpoint `{result['checkpoint']['path']}` (SHA256SUMS sha256 "
             f"`{str(result['checkpoint']['sha256sums_sha256'])[:16]}`); {counts['scored']} pairs, every caption "
             "ranked against every image of the set.", "",
             "| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for name, key in (("text -> image", "text_to_image"), ("image -> text", "image_to_text"), ("chance", "chance")):
        lines.append(f"| {name} | " + " | ".join(f"{results[key][f'r@{k}']:.1f}" for k in KS) + " |")
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts["failed_by_reason"].items()) or "none"
    lines += ["", f"Recall in percent. Rows: {counts['rows']} in the TSV, {counts['considered']} considered, "
                  f"{counts['scored']} scored, {counts['failed']} dropped ({reasons}; listed in result.json).", "",
              "No paper number: the paper reports no CC3M recall; the reference only logs text->image top-1/top-5 "
              "during training (gill/validate.py).", ""]
    return "\n".join(lines)
