"""VIST contextual image generation (the paper's Table 1): generate a story's 5th image from its context and
compare it with the real 5th photo by CLIP image-image similarity and LPIPS.

As the reference (``evals/generate_vist_images.py``): the context is ``[caption1, image1, ..., caption4, image4,
caption5]`` with images squashed to 224x224; an image is forced right after it (``num_words=2``,
``gen_scale_factor=1e5``: the ``[IMG0]`` logit is scaled so far up that it is always chosen) and generated
whatever the decision head says (the reference evaluates without retrieval embeddings, so it always
generates; here retrieval is switched off); guidance 7.5, 50 PNDM steps, seed 42. Contexts:

- ``captions-images``: 5 captions + 4 images (the reference's script; the paper's headline 0.641),
- ``captions``: the 5 captions only,
- ``caption``: the 5th caption only.

Difference from the reference: it draws every story's noise from one generator seeded once, so a story's
image depends on the stories before it; here every story starts from ``seed``, so results do not depend on
order or on ``--max-stories``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from gill.errors import InputError
from gill.evaluation.datasets import ImageFolder, VistSplit, VistStory, squash
from gill.evaluation.generation import Generate, PairScores, forced_generation_options
from gill.options import GenerationOptions

CONTEXTS = {"captions-images": "5 captions + 4 images", "captions": "5 captions", "caption": "1 caption"}


def check_selection(contexts: tuple[str, ...], max_stories: int | None) -> None:
    """Raise :class:`InputError` unless ``contexts`` names known context settings and ``max_stories`` is >= 1."""
    unknown = [c for c in contexts if c not in CONTEXTS]
    if unknown or not contexts:
        raise InputError(f"contexts {list(contexts)}: choose one or more of {list(CONTEXTS)}")
    if max_stories is not None and max_stories < 1:
        raise InputError(f"max_stories={max_stories}: give at least 1, or None for all")


@dataclass(frozen=True)
class VistSettings:
    """One run's settings; defaults are the reference's."""

    contexts: tuple[str, ...] = ("captions-images",)
    seed: int = 42
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"
    squash_size: int = 224  # the reference's downloads are 224x224
    max_stories: int | None = None  # the first N stories (of those with all five photos); None: all

    def __post_init__(self) -> None:
        check_selection(self.contexts, self.max_stories)
        self.options()  # validates the generation options now

    def options(self) -> GenerationOptions:
        """The forced-generation options of every story (``num_words=2, gen_scale_factor=1e5``)."""
        return forced_generation_options(self.seed, self.guidance_scale, self.num_inference_steps, self.scheduler)


def story_parts(story: VistStory, images: Sequence[Image.Image], context: str) -> list[str | Image.Image]:
    """The model's input for one story: ``images`` are its first four photos (already squashed)."""
    captions = story.captions
    if context == "caption":
        return [captions[-1]]
    if context == "captions":
        return list(captions)
    parts: list[str | Image.Image] = []
    for caption, image in zip(captions[:-1], images[:4]):
        parts += [caption, image]
    return parts + [captions[-1]]


def usable_stories(split: VistSplit, folder: ImageFolder, squash_size: int, limit: int | None
                   ) -> tuple[list[tuple[VistStory, list[Image.Image]]], int]:
    """Stories of five sentences whose five photos all load (squashed), up to ``limit``; and how many were
    skipped for a missing or unreadable photo (stories of another length are skipped too and counted)."""
    usable, skipped = [], 0
    for story in split.stories:
        if limit is not None and len(usable) >= limit:
            break
        loaded = [folder.load(image_id) for image_id in story.image_ids]
        if len(story.items) != 5 or any(image is None for image in loaded):
            skipped += 1
            continue
        usable.append((story, [squash(image, squash_size) for image in loaded]))
    return usable, skipped


def evaluate_vist(split: VistSplit, folder: ImageFolder, generate: Generate, clip, lpips, settings: VistSettings,
                  out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the VIST generation eval; returns the result's ``results``, ``counts`` and ``stories`` parts (the
    caller adds the run's identity). ``clip`` is a :class:`~gill.evaluation.metrics.ClipSimilarity`, ``lpips``
    an :class:`~gill.evaluation.metrics.Lpips` or None (not computed). Generated images go to
    ``out/generated/<context>/<target photo id>.png`` when ``out`` is given."""
    from tqdm import tqdm

    stories, skipped = usable_stories(split, folder, settings.squash_size, settings.max_stories)
    options = settings.options()
    results, records = {}, []
    for context in settings.contexts:
        scores = PairScores(clip, lpips, out / "generated" / context if out is not None else None)
        for story, images in tqdm(stories, desc=f"VIST {context}", disable=not progress, unit="story"):
            target_id = story.image_ids[-1]
            generated = generate(story_parts(story, images[:4], context), options)
            record = {"context": context, "story_id": story.story_id, "target": target_id}
            records.append(scores.add(record, target_id, generated, images[-1]))
        results[context] = scores.result()
    problems = folder.summary()
    counts = {"stories": len(split.stories), "evaluated": len(stories), "skipped_missing_images": skipped,
              "images_missing": problems["missing"], "images_unreadable": problems["unreadable"]}
    return {"settings": asdict(settings) | {"options": options.to_dict()}, "results": results, "counts": counts,
            "stories": records}
