"""VIST contextual image retrieval (the paper's Table 5): from a story's context, rank every photo of the split
and report recall@1/5/10 of the real 5th photo.

The reference ships no script for it (kohjingyu/gill#23, #35 point to FROMAGe's ``evals/eval_vist_retrieval.py``),
so this follows FROMAGe's protocol with GILL's retrieval embeddings:

- candidates: every photo of the split that loads (squashed to 224x224), embedded with ``visual_fc`` on the CLIP
  pooled output, L2-normalised;
- query: the context (``[caption1, image1, ..., image4, caption5]``) followed by ``[IMG0..7]`` (forced, as in
  generation), the ``[IMG0]`` state through ``ret_text_hidden_fcs``, L2-normalised;
- the story's four context photos are excluded from the ranking (FROMAGe subtracts 10000 from their scores);
- a story is evaluated only when all five of its photos load. ``exp(logit_scale)`` scales every score alike, so
  it does not change a ranking and is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gill.evaluation.datasets import ImageFolder, VistSplit, squash
from gill.evaluation.vist import check_selection, story_parts, usable_stories
from gill.options import GenerationOptions

KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalSettings:
    contexts: tuple[str, ...] = ("captions-images",)
    squash_size: int = 224
    max_stories: int | None = None
    batch_size: int = 32  # candidate photos embedded per forward

    def __post_init__(self) -> None:
        check_selection(self.contexts, self.max_stories)


# Only the [IMG0..7] states are needed: no diffusion, no corpus search.
QUERY_OPTIONS = GenerationOptions(max_new_tokens=1, ret_scale_factor=1e5, max_images=1, allow_retrieval=False,
                                  allow_generation=False)


def candidate_embeddings(pipeline, split: VistSplit, folder: ImageFolder, settings: RetrievalSettings,
                         progress: bool = True) -> tuple[list[str], np.ndarray]:
    """Photo ids that load and their ``[C, ret_emb_dim]`` float32 unit retrieval vectors."""
    from tqdm import tqdm

    ids = [image_id for image_id in split.image_ids if folder.load(image_id) is not None]
    rows = []
    for start in tqdm(range(0, len(ids), settings.batch_size), desc="embedding photos", disable=not progress):
        chunk = ids[start:start + settings.batch_size]
        batch = [squash(folder.load(image_id), settings.squash_size) for image_id in chunk]
        with torch.inference_mode():
            rows.append(pipeline.components.encode_images(batch)[1].float().cpu().numpy())
    dim = pipeline.components.model.args.ret_emb_dim if not rows else rows[0].shape[1]
    return ids, np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)


def query_embedding(pipeline, parts) -> np.ndarray | None:
    """``[ret_emb_dim]`` float32 unit text-side vector after ``parts`` and a forced ``[IMG0..7]``; None if the model
    produced no ``[IMG]`` tokens."""
    from gill.events import ImageRequest

    stream = pipeline.stream(parts, QUERY_OPTIONS)
    try:
        for event in stream:
            if isinstance(event, ImageRequest):
                query, _ = pipeline.components.image_heads(event.hidden_states[None])
                return query[0].float().cpu().numpy()
    finally:
        stream.close()
    return None


def evaluate_vist_retrieval(split: VistSplit, folder: ImageFolder, pipeline, settings: RetrievalSettings,
                            progress: bool = True) -> dict[str, Any]:
    """Recall@1/5/10 (in percent) per context; returns ``settings``, ``results``, ``counts`` and ``stories``."""
    from tqdm import tqdm

    from gill.evaluation.metrics import recall_at_k

    ids, candidates = candidate_embeddings(pipeline, split, folder, settings, progress)
    index = {image_id: row for row, image_id in enumerate(ids)}
    stories, skipped = usable_stories(split, folder, settings.squash_size, settings.max_stories)
    results, records = {}, []
    for context in settings.contexts:
        scores, targets, no_query = [], [], 0
        for story, images in tqdm(stories, desc=f"VIST retrieval {context}", disable=not progress, unit="story"):
            query = query_embedding(pipeline, story_parts(story, images[:4], context))
            target = index[story.image_ids[-1]]
            row = np.zeros(len(ids)) if query is None else candidates.astype(np.float64) @ query
            for seen in story.image_ids[:-1]:  # the context photos are never the answer
                if index[seen] != target:
                    row[index[seen]] = -np.inf
            if query is None:
                no_query += 1
                row[target] = -1.0  # below every other candidate: a story without a query counts as a miss
            scores.append(row)
            targets.append(target)
            rank = int(np.sum(row > row[target]))
            records.append({"context": context, "story_id": story.story_id, "target": story.image_ids[-1],
                            "rank": rank, "top10": [ids[i] for i in np.argsort(-row, kind="stable")[:10]]})
        recall = {}
        if scores:
            recall = {f"r@{k}": 100 * value for k, value in recall_at_k(np.stack(scores), targets, KS).items()}
        results[context] = {"recall": recall, "queries": len(scores), "no_query": no_query}
    problems = folder.summary()
    counts = {"stories": len(split.stories), "evaluated": len(stories), "skipped_missing_images": skipped,
              "candidates": len(ids), "images_missing": problems["missing"],
              "images_unreadable": problems["unreadable"]}
    return {"settings": asdict(settings) | {"options": QUERY_OPTIONS.to_dict()}, "results": results,
            "counts": counts, "stories": records}
