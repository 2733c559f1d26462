"""``gill eval decision``: how often a checkpoint's retrieve-or-generate head agrees with the PartiPrompts raters.

The head already in the checkpoint is scored, nothing is trained: the reference's notebook
(``TrainDecisionClassifier.ipynb``) reports its head's macro-F1 on the validation split, the confident ``gen``/``ret``
rows after the first 600 in file order. The stages reuse :mod:`gill.training.decision`: the same file formats
(:func:`~gill.training.decision.read_annotations`), the same split
(:func:`~gill.training.decision.split_annotations`), the same ``[IMG0]`` features
(:func:`~gill.training.decision.extract_features`) and the same metrics, so a head written by
``gill train-decision`` scores here what training reported for it.

Splits:

- ``validation``: the rows after the first ``train_size`` confident ones (311 of 911 on the reference's data);
  the majority-class baseline predicts the class most frequent in the first ``train_size`` rows, as training.
- ``all``: every confident row (for a head trained on other data); the baseline predicts the class most frequent
  among them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gill.adapters import DECISION_CLASSES
from gill.convert import DECISION_FILE
from gill.errors import CheckpointError, InputError
from gill.training.decision import (
    Annotation,
    class_indices,
    evaluate,
    extract_features,
    majority_class,
    predict,
    read_annotations,
    split_annotations,
)

if TYPE_CHECKING:
    from gill.model import GILL

SPLITS = ("validation", "all")


@dataclass(frozen=True)
class DecisionEvalSettings:
    """One run's settings; the defaults are the reference notebook's split."""

    split: str = "validation"
    # The first 600 confident rows in file order trained the reference's head; the rest validate.
    train_size: int = 600
    # Prompts per LM forward while extracting features; lower it if the LM runs out of memory.
    batch_size: int = 32

    def __post_init__(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.train_size < 1:
            problems.append(f"train_size must be at least 1, got {self.train_size}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if problems:
            raise InputError("; ".join(problems))


def _no_head(directory: Path) -> CheckpointError:
    return CheckpointError(f"{directory}: the checkpoint has no decision head ({DECISION_FILE}); train one with "
                           f"`gill train-decision {directory} ANNOTATIONS` (or `gill convert {directory}` if it has "
                           f"the reference's decision_model.pth.tar)")


def load_model(checkpoint: str | Path, device: str | torch.device | None = None) -> GILL:
    """The checkpoint's LM and decision head (no vision tower). Raises :class:`CheckpointError` before loading
    the LM when there is no head to score."""
    from gill.model import GILL

    directory = Path(checkpoint)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not (directory / DECISION_FILE).is_file():
        raise _no_head(directory)
    model = GILL.from_checkpoint(directory, device=device, parts=("lm",))
    if model.decision_head is None:
        raise _no_head(directory)
    return model


def select_rows(annotations: list[Annotation], settings: DecisionEvalSettings
                ) -> tuple[list[Annotation], list[Annotation]]:
    """(rows to score, rows whose majority class is the baseline) for ``settings.split``."""
    if settings.split == "validation":
        train, validation = split_annotations(annotations, settings.train_size)
        return validation, train
    confident = [a for a in annotations if a.label != "same"]
    if not confident:
        raise InputError("no prompt has a gen or ret label; every row is 'same'")
    return confident, confident


def evaluate_decision(model: GILL, annotations: str | Path, settings: DecisionEvalSettings = DecisionEvalSettings(),
                      progress: bool = True) -> dict[str, Any]:
    """Score ``model.decision_head`` on the annotation TSV; returns the result's ``settings``, ``counts``,
    ``results`` and ``rows`` parts (the caller adds the run's identity).

    The head runs in float32 on the CPU on the float32 ``[IMG0]`` features, as ``gill train-decision`` scores it.
    ``rows`` holds each scored prompt's file line, label, prediction and ``p_ret`` (softmax probability of ``ret``).
    """
    if model.decision_head is None:
        raise _no_head(model.directory or Path("?"))
    rows = read_annotations(annotations)
    scored, majority_rows = select_rows(rows, settings)
    features = extract_features(model, [a.prompt for a in scored], settings.batch_size, progress).cpu()
    head = _float_copy(model.decision_head)
    predictions = predict(head, features)
    with torch.no_grad():
        p_ret = head(features).softmax(dim=-1)[:, DECISION_CLASSES.index("ret")]
    targets = class_indices(scored)
    majority = majority_class(majority_rows)
    baseline = torch.full_like(targets, DECISION_CLASSES.index(majority))
    labels, predicted = Counter(a.label for a in scored), Counter(DECISION_CLASSES[i] for i in predictions.tolist())
    counts = {"annotated": len(rows), "dropped_same": sum(a.label == "same" for a in rows),
              "confident": sum(a.label != "same" for a in rows),
              "train": settings.train_size if settings.split == "validation" else None, "evaluated": len(scored),
              "labels": {c: labels[c] for c in DECISION_CLASSES},
              "predicted": {c: predicted[c] for c in DECISION_CLASSES}}
    results = {"head": asdict(evaluate(predictions, targets)), "baseline": asdict(evaluate(baseline, targets)),
               "majority": majority}
    records = [{"line": a.line, "prompt": a.prompt, "label": a.label, "prediction": DECISION_CLASSES[k],
                "p_ret": float(p)} for a, k, p in zip(scored, predictions.tolist(), p_ret.tolist(), strict=True)]
    return {"settings": asdict(settings), "decision_head": _head_identity(model), "counts": counts,
            "results": results, "rows": records}


def _float_copy(head: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode (the served head may sit on a GPU in bf16; the model's own is untouched)."""
    import copy

    return copy.deepcopy(head).float().cpu().eval()


def _head_identity(model: GILL) -> dict[str, Any]:
    head = model.decision_head
    identity: dict[str, Any] = {"lm_width": int(head[1].in_features)} if head is not None else {}
    if model.directory is not None and (model.directory / DECISION_FILE).is_file():
        path = model.directory / DECISION_FILE
        identity |= {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return identity
