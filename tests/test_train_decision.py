"""`gill train-decision` on a synthetic PartiPrompts-format set: the agreement rule, the file formats, and a head
trained on the tiny checkpoint that separates two kinds of prompt and loads back through GILL.decide."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from gill.decoding import Decoder
from gill.errors import InputError
from gill.integrity import read_checksums, verify_checkpoint
from gill.model import GILL
from gill.training.decision import (
    DecisionTrainingConfig,
    confident_label,
    extract_features,
    fit_decision_head,
    predict,
    read_annotations,
    split_annotations,
    train_decision,
)

RAW_HEADER = ["Prompt", "Category", "Challenge", "Note", "Decisions"]
CONFIDENT_HEADER = ["Prompt", "Category", "Challenge", "Note", "Decision"]

# Every branch of the rule: (votes, confident label).
RULE_CASES = [
    ("ret,ret,ret,ret,ret", "ret"),       # 5-0
    ("gen,gen,gen,gen,gen", "gen"),
    ("ret,gen,ret,ret,ret", "ret"),       # 4-1
    ("gen,gen,ret,gen,gen", "gen"),
    ("same,ret,ret,ret,ret", "ret"),      # 4 and a same
    ("ret,gen,same,ret,ret", "ret"),      # 3-1 and a same
    ("gen,same,same,gen,gen", "gen"),     # 3-0 and two same
    ("ret,gen,ret,gen,ret", "same"),      # 3-2: the other side has 2
    ("gen,ret,gen,ret,gen", "same"),
    ("ret,ret,gen,gen,same", "same"),     # 2-2
    ("same,same,same,ret,gen", "same"),   # 3 same
    ("same,same,same,ret,ret", "same"),   # 3 same, the rest all one side
    ("same,same,same,same,same", "same"),
    ("ret,ret,ret,gen", "ret"),           # a row with 4 votes, as two rows of the reference's files
    ("ret,same,ret,gen", "same"),
]

SUBJECTS = ["cat", "dog", "horse", "tree", "car", "house", "boat", "bird", "chair", "clock", "apple", "river",
            "bridge", "flower", "train", "lamp"]
RET_VOTES = ["ret,ret,ret,ret,ret", "ret,gen,ret,ret,ret", "ret,gen,same,ret,ret", "same,ret,same,ret,ret"]
GEN_VOTES = ["gen,gen,gen,gen,gen", "gen,gen,ret,gen,gen", "same,gen,ret,gen,gen", "gen,same,same,gen,gen"]
SAME_VOTES = ["ret,gen,ret,gen,ret", "same,same,same,gen,gen"]
TRAIN_SIZE = 20  # of the 32 gen/ret rows; the other 12 (6 of each) validate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(row) + "\n" for row in [header, *rows]), encoding="utf-8")
    return path


def synthetic_rows() -> list[tuple[str, str]]:
    """(prompt, votes) in file order: "a photo of a real X" voted ret and "an imaginative painting of a X" voted
    gen, alternating, with a split-vote "a sketch of a X" (confident label same) after every fourth subject."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        rows.append((f"a photo of a real {subject}", RET_VOTES[i % len(RET_VOTES)]))
        rows.append((f"an imaginative painting of a {subject}", GEN_VOTES[i % len(GEN_VOTES)]))
        if i % 4 == 3:
            rows.append((f"a sketch of a {subject}", SAME_VOTES[i // 4 % len(SAME_VOTES)]))
    return rows


def raw_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    return write_tsv(path, RAW_HEADER, [[prompt, "Synthetic", "Basic", "", votes] for prompt, votes in rows])


@pytest.mark.parametrize(("votes", "label"), RULE_CASES)
def test_confident_rule(votes, label):
    assert confident_label(votes.split(",")) == label


def test_raw_file_applies_the_rule_row_by_row(tmp_path):
    rows = [(f"prompt {i} with a \"quote\"", votes) for i, (votes, _) in enumerate(RULE_CASES)]
    annotations = read_annotations(raw_tsv(tmp_path / "PartiPromptsAllDecisions_Alignment.tsv", rows))
    assert [a.label for a in annotations] == [label for _, label in RULE_CASES]
    assert [a.prompt for a in annotations] == [prompt for prompt, _ in rows]
    assert [",".join(a.votes) for a in annotations] == [votes for votes, _ in RULE_CASES]
    assert [a.line for a in annotations] == list(range(2, len(RULE_CASES) + 2))


def test_confident_file_gives_the_same_labels(tmp_path):
    rows = synthetic_rows()
    raw = read_annotations(raw_tsv(tmp_path / "raw.tsv", rows))
    confident = write_tsv(tmp_path / "PartiPromptsDecisionsConfident.tsv", CONFIDENT_HEADER,
                          [[a.prompt, "Synthetic", "Basic", "", a.label] for a in raw])
    processed = read_annotations(confident)
    assert [(a.prompt, a.label) for a in processed] == [(a.prompt, a.label) for a in raw]
    assert all(a.votes is None for a in processed)


@pytest.mark.parametrize(("header", "row", "message"), [
    (["Text", "Decisions"], ["a cat", "ret,ret,ret,ret,ret"], "found columns ['Text', 'Decisions']"),
    (["Prompt", "Category"], ["a cat", "Animals"], "found columns ['Prompt', 'Category']"),
    (["Prompt", "Decision", "Decisions"], ["a cat", "ret", "ret,ret,ret,ret,ret"], "either Decisions"),
    (RAW_HEADER, ["a cat", "", "", "", "ret,gen,maybe,ret,ret"], ":2: expected 1 to 5 comma-separated votes"),
    (RAW_HEADER, ["a cat", "", "", "", "ret,ret,ret,ret,ret,ret"], ":2: expected 1 to 5"),
    (RAW_HEADER, ["a cat", "", "", "", ""], ":2: expected 1 to 5"),
    (RAW_HEADER, ["a cat", "", "", "ret,ret,ret,ret,ret"], ":2: 4 tab-separated fields where the header has 5"),
    (RAW_HEADER, [" ", "", "", "", "ret,ret,ret,ret,ret"], ":2: empty prompt"),
    (CONFIDENT_HEADER, ["a cat", "", "", "", "retrieve"], ":2: the Decision column must be one of gen, ret, same"),
])
def test_format_errors(tmp_path, header, row, message):
    with pytest.raises(InputError) as error:
        read_annotations(write_tsv(tmp_path / "bad.tsv", header, [row]))
    assert message in str(error.value)


def test_missing_empty_and_headless_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_annotations(tmp_path / "absent.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match="empty file"):
        read_annotations(tmp_path / "empty.tsv")
    with pytest.raises(InputError, match="no annotated prompts"):
        read_annotations(write_tsv(tmp_path / "header.tsv", RAW_HEADER, []))


def test_split_keeps_file_order_and_drops_same(tmp_path):
    annotations = read_annotations(raw_tsv(tmp_path / "raw.tsv", synthetic_rows()))
    train, validation = split_annotations(annotations, TRAIN_SIZE)
    confident = [a for a in annotations if a.label != "same"]
    assert train + validation == confident and len(train) == TRAIN_SIZE
    with pytest.raises(InputError, match="32 prompts have a gen or ret label, but train_size is 32"):
        split_annotations(annotations, 32)
    only_ret = [a for a in confident if a.label == "ret"] + [a for a in confident if a.label == "gen"]
    with pytest.raises(InputError, match="no gen label"):
        split_annotations(only_ret, 10)
    with pytest.raises(InputError, match="train_size must be at least 1, got 0; steps must be at least 1, got 0"):
        DecisionTrainingConfig(train_size=0, steps=0)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """The tiny checkpoint copied, a head trained on the synthetic set and written into the copy."""
    directory = tmp_path_factory.mktemp("decision") / "checkpoint"
    shutil.copytree(tiny_dir, directory)
    annotations = raw_tsv(directory.parent / "PartiPromptsAllDecisions_Alignment.tsv", synthetic_rows())
    config = DecisionTrainingConfig(train_size=TRAIN_SIZE, steps=300)
    result = train_decision(directory, annotations, config, device="cpu", progress=False)
    return directory, annotations, result


def test_training_beats_the_majority_baseline(trained):
    directory, _, result = trained
    assert result.class_counts == {"train": {"gen": 10, "ret": 10}, "validation": {"gen": 6, "ret": 6}}
    assert result.dropped_same == 4 and result.majority == "gen"
    assert result.baseline.macro_f1 == pytest.approx(1 / 3) and result.baseline.accuracy == 0.5
    assert result.validation.macro_f1 >= 0.9 and result.validation.macro_f1 > result.baseline.macro_f1 + 0.5
    assert result.path == directory / "decision_model.safetensors"
    assert result.as_dict()["validation"]["macro_f1"] == result.validation.macro_f1


def test_written_head_serves_the_same_decisions(trained):
    directory, annotations, result = trained
    digest = hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert read_checksums(directory)["decision_model.safetensors"] == digest
    verify_checkpoint(directory, full=True)  # every listed file re-hashed; the head's shape checked
    prompts = [a.prompt for a in read_annotations(annotations)]
    model = GILL.from_checkpoint(directory, device="cpu", parts=("lm",))
    decoder = Decoder(model.lm, model.tokens)
    states = torch.stack([decoder.image_states(model.embed_tokens(model.tokenize(p, add_bos=True))) for p in prompts])
    features = extract_features(model, prompts, batch_size=8, progress=False)  # padded batches, sorted by length
    torch.testing.assert_close(features, states[:, 0], atol=1e-5, rtol=1e-5)
    decision = model.decide(states)
    assert decision.choices == [("gen", "ret")[i] for i in predict(result.head, features).tolist()]
    torch.testing.assert_close(decision.probabilities, result.head(features).softmax(dim=-1))
    expected = ["ret" if "photo" in p else "gen" for p in prompts if "sketch" not in p][TRAIN_SIZE:]
    served = [c for c, p in zip(decision.choices, prompts, strict=True) if "sketch" not in p][TRAIN_SIZE:]
    assert sum(e == s for e, s in zip(expected, served, strict=True)) >= 11  # validation prompts, as scored


def test_same_seed_same_head(trained):
    directory, annotations, _ = trained
    model = GILL.from_checkpoint(directory, device="cpu", parts=("lm",))
    train, _ = split_annotations(read_annotations(annotations), TRAIN_SIZE)
    features = extract_features(model, [a.prompt for a in train], progress=False)
    labels = torch.tensor([("gen", "ret").index(a.label) for a in train])
    config = DecisionTrainingConfig(train_size=TRAIN_SIZE, steps=50)
    rng = torch.random.get_rng_state()
    first, loss = fit_decision_head(features, labels, config)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    second, again = fit_decision_head(features, labels, config)
    other, _ = fit_decision_head(features, labels, DecisionTrainingConfig(train_size=TRAIN_SIZE, steps=50, seed=1))
    assert loss == again
    assert all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in first.state_dict())
    assert not torch.equal(first.state_dict()["1.weight"], other.state_dict()["1.weight"])
