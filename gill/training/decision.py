"""``gill train-decision``: train the retrieve-or-generate head on PartiPrompts annotations.

The reference (``scripts/process_p2_annotations.py`` and the ``TrainDecisionClassifier`` notebook) reads
PartiPrompts prompts that 5 raters each marked ``ret`` (a retrieved image is better), ``gen`` (a generated one is
better) or ``same``, keeps a label only where the raters agree, and fits ``Dropout(0.5) -> Linear(D, 2)`` on the
frozen LM's last-layer state at ``[IMG0]`` after the prompt. The stages here, top to bottom:

1. :func:`read_annotations`: one TSV, raw votes or already-confident labels, with :func:`confident_label`.
2. :func:`split_annotations`: of the ``gen``/``ret`` rows in file order, the first ``train_size`` train and
   the rest validate (600 / 311 on the reference's data).
3. :func:`extract_features`: one batched text-only forward per prompt, ``[IMG0]`` state kept.
4. :func:`fit_decision_head`: AdamW on the whole training split at once, seeded.
5. :func:`evaluate`: validation macro-F1 and accuracy, beside the majority-class baseline.
6. :func:`write_decision_head`: ``decision_model.safetensors`` in the serving layout, ``SHA256SUMS`` refreshed.

:func:`train_decision` runs all of them. On the reference's data and weights the notebook reports a validation
macro-F1 of about 0.54 (the majority class, ``gen``, scores 0.39 there); humans agree at 0.85.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from gill.adapters import DECISION_CLASSES, make_decision_head
from gill.convert import DECISION_FILE
from gill.errors import InputError

if TYPE_CHECKING:
    from gill.model import GILL

LABELS = (*DECISION_CLASSES, "same")  # what a vote or a confident label may say
PROMPT_COLUMN = "prompt"
VOTES_COLUMN = "decisions"  # raw files: the raters' votes, comma-separated
LABEL_COLUMN = "decision"  # processed files: one label per prompt
MAX_VOTES = 5  # PartiPrompts was annotated by 5 raters; two rows of the reference's files kept only 4 votes


@dataclass(frozen=True)
class Annotation:
    """One annotated prompt.

    label: ``gen``, ``ret`` or ``same`` (the confident label; ``same`` rows are not trained on).
    votes: the raters' votes for a raw file, None for a file of confident labels.
    line: the 1-based line of the TSV the row came from, for messages.
    """

    prompt: str
    label: str
    votes: tuple[str, ...] | None
    line: int


@dataclass(frozen=True)
class DecisionTrainingConfig:
    """Hyperparameters of the decision head; the defaults are the reference notebook's."""

    # The first 600 confident rows in file order train, the rest (311 on the reference's data) validate.
    train_size: int = 600
    # Full-batch steps: the training split is a few hundred vectors, so every step sees all of them.
    steps: int = 2000
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # torch.manual_seed(1337) in the notebook; it seeds the head's initialisation and the dropout masks.
    seed: int = 1337
    # Prompts per forward pass of the frozen LM when extracting features; lower it if the LM runs out of memory.
    batch_size: int = 32

    def __post_init__(self) -> None:
        problems = []
        if self.train_size < 1:
            problems.append(f"train_size must be at least 1, got {self.train_size}")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if problems:
            raise InputError("; ".join(problems))


@dataclass(frozen=True)
class DecisionMetrics:
    """Scores of predictions against labels on one split.

    macro_f1: the mean over ``gen`` and ``ret`` of each class's F1, in [0, 1]; a class neither present nor
    predicted scores 0 (as scikit-learn's default).
    """

    macro_f1: float
    accuracy: float


@dataclass(frozen=True)
class DecisionTrainingResult:
    """What :func:`train_decision` did and how well the head does.

    class_counts: ``{"train": {"gen": n, "ret": n}, "validation": {...}}`` rows per split and class.
    dropped_same: annotated rows whose confident label is ``same`` (not trained on).
    majority: the class most frequent in the training split; ``baseline`` scores always predicting it on
    the validation split, the figure to beat.
    head: the trained ``Sequential(Dropout, Linear(lm_width, 2))``, float32 on the CPU, in eval mode.
    path: where the head was written, or None when it was not written.
    """

    validation: DecisionMetrics
    baseline: DecisionMetrics
    train: DecisionMetrics
    majority: str
    class_counts: dict[str, dict[str, int]]
    dropped_same: int
    final_loss: float
    config: DecisionTrainingConfig
    head: nn.Sequential = field(repr=False)
    path: Path | None = None

    def as_dict(self) -> dict:
        """The metrics and settings as JSON-ready values (the head left out)."""
        return {
            "validation": asdict(self.validation), "baseline": asdict(self.baseline), "train": asdict(self.train),
            "majority": self.majority, "class_counts": self.class_counts, "dropped_same": self.dropped_same,
            "final_loss": self.final_loss, "config": asdict(self.config),
            "path": None if self.path is None else str(self.path),
        }


def confident_label(votes: Sequence[str]) -> str:
    """The reference's agreement rule: ``gen`` or ``ret`` when that side has 4 or more votes, or 3 votes with at
    most 1 for the other side; otherwise ``same``. Votes are ``gen``, ``ret`` or ``same``.

    >>> confident_label(["ret", "gen", "ret", "same", "ret"])
    'ret'
    >>> confident_label(["ret", "gen", "ret", "gen", "ret"])
    'same'
    """
    counts = Counter(votes)
    unknown = set(counts) - set(LABELS)
    if unknown:
        raise InputError(f"unknown votes {sorted(unknown)}; each vote is one of {', '.join(LABELS)}")
    for side, other in (("gen", "ret"), ("ret", "gen")):
        # At most one side can qualify: 4+ votes leave at most 1 of 5 for the other, and 3 requires other <= 1.
        if counts[side] >= 4 or (counts[side] == 3 and counts[other] <= 1):
            return side
    return "same"


def _column(names: list[str], wanted: str) -> int | None:
    matches = [i for i, name in enumerate(names) if name.strip().lower() == wanted]
    return matches[0] if len(matches) == 1 else None


def read_annotations(path: str | Path) -> list[Annotation]:
    """Read a PartiPrompts decision TSV, in file order.

    Two formats are accepted, told apart by the header (tab-separated, UTF-8, column names case-insensitive,
    other columns such as ``Category``, ``Challenge``, ``Note`` ignored; no quoting, so prompts may hold ``"``):

    - raw votes, as ``PartiPromptsAllDecisions_{Alignment,Realism}.tsv``: ``Prompt`` and ``Decisions``, the
      latter 1 to 5 comma-separated votes, each ``gen``, ``ret`` or ``same`` (``ret,gen,gen,same,gen``). The
      label is :func:`confident_label` of the votes. (The reference derived its training file from the
      Alignment file alone.)
    - confident labels, as ``PartiPromptsDecisionsConfident.tsv``: ``Prompt`` and ``Decision``, one of ``gen``,
      ``ret`` or ``same``.

    Raises :class:`InputError`, naming the file, line and columns found, for anything else.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError as error:
        raise InputError(f"{path}: annotation file not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({error})") from error
    if not rows:
        raise InputError(f"{path}: empty file; expected a header line with the columns Prompt and Decisions "
                         "(comma-separated rater votes) or Decision (one confident label)")
    header = rows[0]
    prompt_index = _column(header, PROMPT_COLUMN)
    votes_index, label_index = _column(header, VOTES_COLUMN), _column(header, LABEL_COLUMN)
    if prompt_index is None or (votes_index is None) == (label_index is None):
        raise InputError(f"{path}: expected tab-separated columns Prompt and either Decisions (comma-separated "
                         f"rater votes, as PartiPromptsAllDecisions_*.tsv) or Decision (one label, as "
                         f"PartiPromptsDecisionsConfident.tsv), each once; found columns {header}")
    annotations = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines, such as a trailing one
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: {len(row)} tab-separated fields where the header has {len(header)} "
                             f"({header})")
        prompt = row[prompt_index].strip()
        if not prompt:
            raise InputError(f"{path}:{line}: empty prompt")
        if votes_index is not None:
            votes = tuple(vote.strip() for vote in row[votes_index].split(","))
            if not 1 <= len(votes) <= MAX_VOTES or not set(votes) <= set(LABELS):
                raise InputError(f"{path}:{line}: expected 1 to {MAX_VOTES} comma-separated votes, each one of "
                                 f"{', '.join(LABELS)}; got {row[votes_index]!r}")
            annotations.append(Annotation(prompt, confident_label(votes), votes, line))
        else:
            label = row[label_index].strip()
            if label not in LABELS:
                raise InputError(f"{path}:{line}: the Decision column must be one of {', '.join(LABELS)}; "
                                 f"got {label!r}")
            annotations.append(Annotation(prompt, label, None, line))
    if not annotations:
        raise InputError(f"{path}: no annotated prompts after the header")
    return annotations


def split_annotations(annotations: Sequence[Annotation],
                      train_size: int = 600) -> tuple[list[Annotation], list[Annotation]]:
    """(train, validation): ``same`` rows dropped, then the first ``train_size`` rows in file order train and
    the rest validate, as the reference (no shuffling: the reference's file keeps PartiPrompts' order, so the
    validation split holds its last prompts)."""
    confident = [a for a in annotations if a.label != "same"]
    if len(confident) <= train_size:
        raise InputError(f"{len(confident)} prompts have a gen or ret label, but train_size is {train_size}; "
                         "lower train_size so that some are left to validate on")
    train, validation = confident[:train_size], confident[train_size:]
    missing = set(DECISION_CLASSES) - {a.label for a in train}
    if missing:
        raise InputError(f"the first {train_size} gen/ret prompts have no {' or '.join(sorted(missing))} label; "
                         "a head cannot learn a class it never sees (change train_size or the row order)")
    return train, validation


def extract_features(model: GILL, prompts: Sequence[str], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """``[N, lm_width]`` float32 features on the model's device: for each prompt, the frozen LM's last-layer state
    (after the final layer norm) at ``[IMG0]`` when the LM reads BOS, the prompt's tokens, then ``[IMG0..7]``.

    ``model`` is a :class:`gill.model.GILL` with its LM loaded. The text-only forward is the reference's
    ``mode='generation'`` pass; the states equal what ``Decoder.image_states`` gives for the same prompt, in
    batches of ``batch_size`` prompts (right-padded: under causal attention the padding after a row's tokens
    cannot change them).
    """
    if model.lm is None:
        raise InputError("extracting decision features needs the language model; load GILL with parts=('lm',)")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    img = torch.tensor(model.tokens.img)
    max_positions = model.lm.config.max_position_embeddings
    sequences = []
    for index, prompt in enumerate(prompts):
        ids = torch.cat([model.tokenize(prompt, add_bos=True), img])
        if ids.shape[0] > max_positions:
            raise InputError(f"prompt {index} ({prompt[:60]!r}...) is {ids.shape[0] - img.shape[0]} tokens; with "
                             f"the {img.shape[0]} [IMG] tokens it exceeds the LM's window of {max_positions}")
        sequences.append(ids)
    # Longest first, so a batch pads little and an out-of-memory error shows in the first batch.
    order = sorted(range(len(sequences)), key=lambda i: -sequences[i].shape[0])
    features = torch.empty(len(sequences), model.lm.config.hidden_size, dtype=torch.float32, device=model.device)
    body = model.lm.get_decoder()
    with torch.no_grad(), tqdm(total=len(sequences), desc="[IMG0] features", unit="prompt",
                               disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(sequences[i].shape[0] for i in rows)
            ids = torch.full((len(rows), width), model.tokens.pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                ids[row, :sequences[i].shape[0]] = sequences[i]
                mask[row, :sequences[i].shape[0]] = 1
            states = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                          use_cache=False).last_hidden_state
            img0 = torch.tensor([sequences[i].shape[0] - img.shape[0] for i in rows], device=states.device)
            features[rows] = states[torch.arange(len(rows), device=states.device), img0].float()
            bar.update(len(rows))
    return features


def class_indices(annotations: Sequence[Annotation]) -> torch.Tensor:
    """``[N]`` int64 class indices (0 = ``gen``, 1 = ``ret``) of gen/ret rows."""
    return torch.tensor([DECISION_CLASSES.index(a.label) for a in annotations], dtype=torch.long)


def majority_class(annotations: Sequence[Annotation]) -> str:
    """The more frequent of ``gen`` and ``ret`` among ``annotations``; ties go to ``gen``, the class the
    reference's data has most of and the one served without a head."""
    counts = Counter(a.label for a in annotations)
    return max(DECISION_CLASSES, key=lambda label: counts[label])


def fit_decision_head(features: torch.Tensor, labels: torch.Tensor,
                      config: DecisionTrainingConfig = DecisionTrainingConfig()) -> tuple[nn.Sequential, float]:
    """Train ``make_decision_head(D)`` on ``[N, D]`` float32 features and ``[N]`` int64 class indices
    (0 = ``gen``, 1 = ``ret``) with full-batch AdamW and cross-entropy, on the features' device.

    Returns (head in eval mode, last training loss). The same seed, data and device give the same head; the
    global RNG is left as it was.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise InputError(f"expected [N, D] features and [N] labels, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    devices = [features.device] if features.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        head = make_decision_head(features.shape[1]).to(features.device).train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        loss_function = nn.CrossEntropyLoss()
        for _ in range(config.steps):
            loss = loss_function(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval(), float(loss.detach())


def macro_f1(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int = len(DECISION_CLASSES)) -> float:
    """The unweighted mean over classes of ``2 TP / (2 TP + FP + FN)``; 0 for a class neither present nor
    predicted. ``predictions`` and ``targets`` are ``[N]`` class indices."""
    scores = []
    for k in range(num_classes):
        true_positive = int(((predictions == k) & (targets == k)).sum())
        false_count = int(((predictions == k) != (targets == k)).sum())  # false positives + false negatives
        denominator = 2 * true_positive + false_count
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / num_classes


def evaluate(predictions: torch.Tensor, targets: torch.Tensor) -> DecisionMetrics:
    """Macro-F1 and accuracy of ``[N]`` class indices against ``[N]`` targets."""
    if targets.numel() == 0:
        raise InputError("no rows to evaluate on")
    accuracy = float((predictions == targets).float().mean())
    return DecisionMetrics(macro_f1=macro_f1(predictions.cpu(), targets.cpu()), accuracy=accuracy)


def predict(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``[N]`` class indices (0 = ``gen``, 1 = ``ret``): the argmax of the head, as ``GILL.decide``."""
    with torch.no_grad():
        return head.eval()(features).argmax(dim=-1)


def write_decision_head(head: nn.Module, directory: str | Path) -> Path:
    """Write ``head`` as ``directory/decision_model.safetensors`` (``1.weight`` [2, D], ``1.bias`` [2], float32),
    the file :meth:`gill.model.GILL.from_checkpoint` loads; refresh ``SHA256SUMS`` when the directory has one.
    The file is replaced atomically; returns its path."""
    from gill.integrity import read_checksums, update_checksums

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: checkpoint directory not found")
    state = {key: value.detach().float().cpu().contiguous() for key, value in head.state_dict().items()}
    if set(state) != {"1.weight", "1.bias"}:
        raise InputError(f"expected a Sequential(Dropout, Linear) decision head; got state keys {sorted(state)}")
    path = directory / DECISION_FILE
    temporary = directory / f".{DECISION_FILE}.{os.getpid()}.tmp"  # hidden: never listed in SHA256SUMS
    try:
        save_file(state, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if read_checksums(directory) is not None:
        update_checksums(directory, [path])
    return path


def train_decision(checkpoint: str | Path, annotations: str | Path,
                   config: DecisionTrainingConfig = DecisionTrainingConfig(), *, output: str | Path | None = None,
                   write: bool = True, device: str | torch.device | None = None,
                   progress: bool = True) -> DecisionTrainingResult:
    """Train the decision head of ``checkpoint`` on the annotation TSV ``annotations`` (see
    :func:`read_annotations` for the formats) and write it into ``output`` (default: ``checkpoint`` itself)
    unless ``write`` is False.

    The frozen LM runs on ``device`` (default: CUDA in bf16 when available, else the CPU in fp32); the head trains
    in float32 on the same device. Metrics are of the head after the last step (the notebook also printed the
    best of its periodic validation scores, which selects on the validation split).
    """
    from gill.model import GILL

    rows = read_annotations(annotations)
    train_rows, validation_rows = split_annotations(rows, config.train_size)
    model = GILL.from_checkpoint(checkpoint, device=device, parts=("lm",))
    prompts = [a.prompt for a in train_rows + validation_rows]
    features = extract_features(model, prompts, config.batch_size, progress)
    train_features, validation_features = features[:len(train_rows)], features[len(train_rows):].cpu()
    train_labels, validation_labels = class_indices(train_rows), class_indices(validation_rows)
    del model  # the LM is no longer needed; free its memory before training

    head, final_loss = fit_decision_head(train_features, train_labels.to(train_features.device), config)
    counts = {name: {label: sum(a.label == label for a in split) for label in DECISION_CLASSES}
              for name, split in (("train", train_rows), ("validation", validation_rows))}
    majority = majority_class(train_rows)
    baseline = torch.full_like(validation_labels, DECISION_CLASSES.index(majority))
    head = head.cpu()
    result = DecisionTrainingResult(
        validation=evaluate(predict(head, validation_features), validation_labels),
        baseline=evaluate(baseline, validation_labels),
        train=evaluate(predict(head, train_features.cpu()), train_labels),
        majority=majority, class_counts=counts, dropped_same=sum(a.label == "same" for a in rows),
        final_loss=final_loss, config=config, head=head)
    if write:
        path = write_decision_head(head, checkpoint if output is None else output)
        result = replace(result, path=path)
    return result
