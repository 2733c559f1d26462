"""`gill eval decision` on the tiny checkpoint with a head trained on the synthetic PartiPrompts-format set of
tests/test_train_decision.py: the eval reproduces what training reported, and records what it ran on."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from test_train_decision import TRAIN_SIZE, raw_tsv, synthetic_rows
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.evaluation.decision import DecisionEvalSettings, evaluate_decision, load_model
from gill.integrity import read_checksums
from gill.training.decision import DecisionTrainingConfig, train_decision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A copy of the tiny checkpoint with a head trained on the synthetic set; the training result."""
    directory = tmp_path_factory.mktemp("eval-decision") / "checkpoint"
    shutil.copytree(tiny_dir, directory)
    annotations = raw_tsv(directory.parent / "PartiPromptsAllDecisions_Alignment.tsv", synthetic_rows())
    result = train_decision(directory, annotations, DecisionTrainingConfig(train_size=TRAIN_SIZE, steps=300),
                            device="cpu", progress=False)
    return directory, annotations, result


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """`gill eval decision` on the validation split: (exit result, result.json, result.md)."""
    directory, annotations, _ = trained
    out = tmp_path_factory.mktemp("eval-decision-out")
    run = CliRunner().invoke(app, ["eval", "decision", str(directory), str(annotations), "--train-size",
                                   str(TRAIN_SIZE), "--out", str(out), "--device", "cpu", "--quiet"])
    assert run.exit_code == 0, run.output
    return run, json.loads((out / "result.json").read_text()), (out / "result.md").read_text()


def test_reproduces_the_training_runs_validation_scores(trained, evaluated):
    _, _, training = trained
    _, data, _ = evaluated
    results = data["results"]
    assert results["head"]["macro_f1"] == training.validation.macro_f1  # exactly: same rows, features, head
    assert results["head"]["accuracy"] == training.validation.accuracy
    assert results["baseline"] == {"macro_f1": training.baseline.macro_f1, "accuracy": training.baseline.accuracy}
    assert results["majority"] == training.majority
    assert data["counts"]["labels"] == training.class_counts["validation"]
    assert data["counts"]["dropped_same"] == training.dropped_same
    assert results["head"]["macro_f1"] > results["baseline"]["macro_f1"]


def test_cli_writes_json_and_markdown(evaluated):
    run, data, markdown = evaluated
    assert data["eval"] == "decision" and len(data["rows"]) == data["counts"]["evaluated"] == 12
    assert {row["label"] for row in data["rows"]} == {"gen", "ret"}
    assert all(0 <= row["p_ret"] <= 1 and row["prediction"] in ("gen", "ret") for row in data["rows"])
    head = data["results"]["head"]["macro_f1"]
    assert f"| this checkpoint's head | {head:.3f} |" in markdown
    assert "always gen (baseline)" in markdown and "0.851" in markdown
    assert "n/a (other split)" in markdown  # train size 20, not the reference's 600: its 0.54 is not comparable
    assert "TrainDecisionClassifier.ipynb" in markdown
    assert "wrote" in run.output


def test_result_records_the_settings(trained, evaluated):
    directory, annotations, training = trained
    _, data, _ = evaluated
    assert data["settings"] == {"split": "validation", "train_size": TRAIN_SIZE, "batch_size": 32}
    assert data["checkpoint"]["path"] == str(directory.resolve())
    sums = hashlib.sha256((directory / "SHA256SUMS").read_bytes()).hexdigest()
    assert data["checkpoint"]["sha256sums_sha256"] == sums
    assert data["decision_head"]["sha256"] == read_checksums(directory)["decision_model.safetensors"]
    assert data["decision_head"]["sha256"] == hashlib.sha256(training.path.read_bytes()).hexdigest()
    assert data["dataset"] == {"name": "PartiPrompts decisions", "path": str(annotations.resolve())}
    assert data["counts"] == {"annotated": 36, "dropped_same": 4, "confident": 32, "train": TRAIN_SIZE,
                              "evaluated": 12, "labels": {"gen": 6, "ret": 6}, "predicted": data["counts"]["predicted"]}
    assert data["device"] == "cpu" and data["versions"]["torch"] and data["started_at"]


def test_all_split_scores_every_confident_row(trained):
    directory, annotations, _ = trained
    model = load_model(directory, "cpu")
    body = evaluate_decision(model, annotations, DecisionEvalSettings(split="all"), progress=False)
    assert body["counts"]["evaluated"] == 32 and body["counts"]["train"] is None
    assert body["counts"]["labels"] == {"gen": 16, "ret": 16} and body["results"]["majority"] == "gen"
    assert body["results"]["head"]["macro_f1"] >= 0.9  # the synthetic set is separable
    with pytest.raises(InputError, match="split must be one of validation, all, got 'test'"):
        DecisionEvalSettings(split="test")


def test_checkpoint_without_a_head_fails_with_the_remedy(tiny_dir, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, directory)
    (directory / "decision_model.safetensors").unlink()
    annotations = raw_tsv(tmp_path / "annotations.tsv", synthetic_rows())
    run = CliRunner().invoke(app, ["eval", "decision", str(directory), str(annotations), "--out",
                                   str(tmp_path / "out"), "--device", "cpu", "--quiet"])
    assert run.exit_code == 2
    assert "no decision head" in run.output and "gill train-decision" in run.output
    assert not (tmp_path / "out").exists()
