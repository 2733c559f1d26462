"""`gill eval cc3m-retrieval` on the tiny checkpoint: a shapes-world validation TSV in the CC3M training format, one
row with a missing image and one with an empty caption; its recall equals what training validation computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.evaluation.cc3m import Cc3mSettings, evaluate_cc3m_retrieval
from gill.training.data import CaptionImageTSV, SampleEncoder
from gill.training.objective import GILLObjective
from gill.training.shapes import make_shapes_dataset
from gill.training.validation import retrieval_recalls, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = 12


@pytest.fixture(scope="module")
def val_tsv(tmp_path_factory) -> Path:
    """12 good pairs at the tiny CLIP's 32 px, then a row whose image is absent and one with an empty caption."""
    data = make_shapes_dataset(tmp_path_factory.mktemp("cc3m"), n_train=1, n_val=PAIRS, image_size=32, seed=3)
    first_image = data.val_tsv.read_text().splitlines()[1].split("\t")
    header = data.val_tsv.read_text().splitlines()[0].split("\t")
    image_column = header.index("image")
    with open(data.val_tsv, "a") as handle:
        missing = ["a red circle on a blue background" if name == "caption" else "images/absent.png"
                   for name in header]
        empty = ["" if name == "caption" else first_image[image_column] for name in header]
        handle.write("\t".join(missing) + "\n" + "\t".join(empty) + "\n")
    return data.val_tsv


def test_recalls_on_hand_built_embeddings_in_any_chunking():
    image = np.eye(4)
    text = np.array([[1, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 0.1, 1], [0, 0, 0, 1]], dtype=np.float64)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # Text 1 and text 2 rank their image second (behind image 0 and image 3); every image finds its own text first.
    for chunk in (1, 3, 2048):
        text_to_image, image_to_text = retrieval_recalls(text, image, ks=(1, 2), chunk=chunk)
        assert text_to_image == {1: 0.5, 2: 1.0} and image_to_text == {1: 1.0, 2: 1.0}
    with pytest.raises(InputError, match="must both be"):
        retrieval_recalls(text, image[:3])


def test_eval_cc3m_retrieval_end_to_end(tmp_path, val_tsv, tiny_dir):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "cc3m-retrieval", str(val_tsv), "--checkpoint", str(tiny_dir),
                                      "--out", str(out), "--batch-size", "5", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["counts"] == {"rows": PAIRS + 2, "considered": PAIRS + 2, "scored": PAIRS, "failed": 2,
                              "failed_by_reason": {"empty_caption": 1, "missing_image": 1}}
    assert [entry["key"] for entry in data["failed"]][0] == "images/absent.png"
    assert data["checkpoint"]["sha256sums_sha256"] and data["eval"] == "cc3m_retrieval"
    for direction in ("text_to_image", "image_to_text"):
        recall = data["results"][direction]
        assert 0 <= recall["r@1"] <= recall["r@5"] <= recall["r@10"] <= 100
    assert data["results"]["chance"]["r@1"] == pytest.approx(100 / PAIRS)
    markdown = (out / "result.md").read_text()
    assert "| text -> image |" in markdown and "1 missing_image" in markdown

    # The same numbers as training validation on the same set (the eval reuses its embedding and recall code).
    objective = GILLObjective.from_checkpoint(tiny_dir, device="cpu")
    encoder = SampleEncoder.from_checkpoint(tiny_dir)
    dataset = CaptionImageTSV(val_tsv, encoder)
    metrics = validate(objective, dataset, encoder.tokenizer, batch_size=5)
    assert metrics.samples == PAIRS and metrics.skipped == 2
    assert data["results"]["text_to_image"]["r@1"] == pytest.approx(100 * metrics.text_to_image_top1)
    assert data["results"]["text_to_image"]["r@5"] == pytest.approx(100 * metrics.text_to_image_top5)
    assert data["results"]["image_to_text"]["r@1"] == pytest.approx(100 * metrics.image_to_text_top1)
    assert data["results"]["image_to_text"]["r@5"] == pytest.approx(100 * metrics.image_to_text_top5)

    # --max-pairs: the first N rows only; a set where nothing loads is a clear error.
    small = evaluate_cc3m_retrieval(objective, dataset, Cc3mSettings(max_pairs=4), progress=False)
    assert small["counts"]["scored"] == 4 and small["results"]["text_to_image"]["r@10"] == 100.0
    empty_dir = tmp_path / "elsewhere"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no pair of the 3 rows"):
        evaluate_cc3m_retrieval(objective, CaptionImageTSV(val_tsv, encoder, image_dir=empty_dir),
                                Cc3mSettings(max_pairs=3), progress=False)


def test_eval_cc3m_retrieval_bad_input(tmp_path, val_tsv, tiny_dir):
    runner = CliRunner()
    absent = runner.invoke(app, ["eval", "cc3m-retrieval", str(tmp_path / "nope.tsv"), "--checkpoint", str(tiny_dir),
                                 "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    assert absent.exit_code == 2 and "no such TSV file" in absent.output
    folder = runner.invoke(app, ["eval", "cc3m-retrieval", str(val_tsv), "--checkpoint", str(tiny_dir), "--images",
                                 str(tmp_path / "no-images"), "--device", "cpu", "--quiet"])
    assert folder.exit_code == 2 and "image folder not found" in folder.output
    with pytest.raises(InputError, match="max_pairs"):
        Cc3mSettings(max_pairs=0)
