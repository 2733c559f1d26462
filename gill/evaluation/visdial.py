"""VisDial contextual image generation (the paper's Table 2): generate an image from the first k rounds of a
dialog and compare it with the dialog's photo by CLIP image-image similarity and LPIPS.

As the reference (``evals/generate_visdial_images.py``): text only; each round becomes ``Q: {question}?`` and
``A: {answer}`` lines, joined with ``\\n`` into one prompt; an image is forced right after it and generated
whatever the decision head says (:mod:`gill.evaluation.generation`); guidance 7.5, 50 PNDM steps, seed 42. The
target is the dialog's photo as it is on disk (the reference scores the original JPEG: CLIP's processor resizes
and crops it, LPIPS resizes both images to 256x256).

The **caption is not fed** by default: the reference's script builds the prompt from the rounds alone, and its
numbers (Table 2) were measured that way. ``include_caption=True`` puts the caption first, as its own line: a
variant, not comparable to the paper.

Settings are round counts (the paper's 1, 5 and 10; the reference's script runs 10 only). All settings are scored
on the same dialogs: those with at least as many rounds as the largest setting and whose photo loads.

Difference from the reference, as for VIST: it draws every dialog's noise from one generator seeded once, so a
dialog's image depends on the dialogs before it; here every dialog starts from ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gill.errors import InputError
from gill.evaluation.generation import Generate, PairScores, forced_generation_options
from gill.evaluation.visdial_data import VisdialDialog, VisdialImages, VisdialSplit
from gill.options import GenerationOptions

PAPER_ROUNDS = (1, 5, 10)  # Table 2's settings


@dataclass(frozen=True)
class VisdialSettings:
    """One run's settings; defaults are the reference's script (10 rounds, no caption)."""

    rounds: tuple[int, ...] = (10,)
    include_caption: bool = False
    seed: int = 42
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"
    max_dialogs: int | None = None  # the first N usable dialogs; None: all

    def __post_init__(self) -> None:
        if not self.rounds or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.rounds):
            raise InputError(f"rounds {list(self.rounds)}: give one or more round counts >= 1 (the paper's: 1, 5, 10)")
        if len(set(self.rounds)) != len(self.rounds):
            raise InputError(f"rounds {list(self.rounds)}: each round count once")
        if self.max_dialogs is not None and self.max_dialogs < 1:
            raise InputError(f"max_dialogs={self.max_dialogs}: give at least 1, or None for all")
        self.options()  # validates the generation options now

    def options(self) -> GenerationOptions:
        return forced_generation_options(self.seed, self.guidance_scale, self.num_inference_steps, self.scheduler)


def dialog_prompt(dialog: VisdialDialog, rounds: int, include_caption: bool = False) -> str:
    """The model's text input: the first ``rounds`` rounds as ``Q: {question}?`` / ``A: {answer}`` lines joined
    with ``\\n`` (the reference's format), after the caption line when ``include_caption``."""
    if rounds > len(dialog.rounds):
        raise InputError(f"dialog of image {dialog.image_id} has {len(dialog.rounds)} rounds, {rounds} asked")
    lines = [dialog.caption] if include_caption else []
    for question, answer in dialog.rounds[:rounds]:
        lines += [f"Q: {question}?", f"A: {answer}"]
    return "\n".join(lines)


def evaluate_visdial(split: VisdialSplit, folder: VisdialImages, generate: Generate, clip, lpips,
                     settings: VisdialSettings, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the VisDial generation eval; returns the result's ``settings``, ``results`` (per round count),
    ``counts`` and ``dialogs`` parts (the caller adds the run's identity). ``clip`` is a
    :class:`~gill.evaluation.metrics.ClipSimilarity`, ``lpips`` an :class:`~gill.evaluation.metrics.Lpips` or
    None. Generated images go to ``out/generated/rounds-<k>/<12-digit image id>.png`` when ``out`` is given."""
    from tqdm import tqdm

    options = settings.options()
    needed = max(settings.rounds)
    scores = {k: PairScores(clip, lpips, out / "generated" / f"rounds-{k}" if out is not None else None)
              for k in settings.rounds}
    records: list[dict[str, Any]] = []
    evaluated = short = no_image_file = 0
    total = len(split.dialogs) if settings.max_dialogs is None else min(settings.max_dialogs, len(split.dialogs))
    bar = tqdm(total=total, desc=f"VisDial rounds {','.join(map(str, settings.rounds))}", unit="dialog",
               disable=not progress)
    # Dialog by dialog (each photo loaded once, then dropped), every round setting in turn.
    for dialog in split.dialogs:
        if settings.max_dialogs is not None and evaluated >= settings.max_dialogs:
            break
        if len(dialog.rounds) < needed:
            short += 1
            continue
        target = folder.load(str(dialog.image_id))
        if target is None:
            no_image_file += 1
            bar.set_postfix(skipped=short + no_image_file)
            continue
        for k in settings.rounds:
            generated = generate([dialog_prompt(dialog, k, settings.include_caption)], options)
            record = {"rounds": k, "image_id": dialog.image_id}
            records.append(scores[k].add(record, dialog.file_id, generated, target))
        evaluated += 1
        bar.update(1)
    bar.close()
    problems = folder.summary()
    counts = {"dialogs": len(split.dialogs), "evaluated": evaluated, "skipped_too_few_rounds": short,
              "skipped_missing_images": no_image_file, "images_missing": problems["missing"],
              "images_unreadable": problems["unreadable"]}
    return {"settings": asdict(settings) | {"options": options.to_dict()},
            "results": {str(k): scores[k].result() for k in settings.rounds}, "counts": counts,
            "image_problems": dict(folder.problems), "dialogs": records}
