"""The training loop on the tiny checkpoint (CPU): it learns, two processes equal one, a resumed run equals an
uninterrupted one, its exports load in-process, through `gill run` and in `gill serve`, and the training commands
work end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gill.cli import app
from gill.components import LocalComponents
from gill.convert import ADAPTERS_FILE, EMBEDDINGS_FILE
from gill.errors import InputError
from gill.events import Done, ImageResult
from gill.integrity import verify_checkpoint
from gill.options import GenerationOptions
from gill.pipeline import Pipeline
from gill.training.sd_targets import preprocess_sd_targets
from gill.training.shapes import ShapesDataset, make_shapes_dataset
from gill.training.trainer import TrainConfig, TrainResult, load_state, train
from gill.training.validation import corpus_bleu

VAL_PAIRS = 32
LOSS_COLUMNS = ["loss", "caption_ce", "img_token_ce", "contrastive", "generation_l2", "grad_norm"]
PROMPT = "Q: show me a red circle on a blue background\nA:"
IMAGE_TURN = GenerationOptions(max_new_tokens=6, gen_scale_factor=1e5, min_word_tokens=2, num_inference_steps=2,
                               seed=1, stop_at_newline=False, stop_at_eos=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> tuple[ShapesDataset, Path]:
    """256 training and 32 validation shapes at the tiny CLIP's 32 px, with SD targets for both splits."""
    root = tmp_path_factory.mktemp("shapes")
    dataset = make_shapes_dataset(root / "data", n_train=256, n_val=VAL_PAIRS, image_size=32, seed=0)
    targets = root / "targets"
    for split in (dataset.train_tsv, dataset.val_tsv):  # keys (image paths) differ, so one folder holds both
        preprocess_sd_targets(split, tiny_dir, targets, progress=False)
    return dataset, targets


def config(tiny_dir: Path, data: tuple[ShapesDataset, Path], out_dir: Path, **overrides) -> TrainConfig:
    """CI-sized settings: fresh adapters, small batches, a short warm-up, no workers, no TensorBoard."""
    dataset, targets = data
    settings = dict(checkpoint=str(tiny_dir), train_data=str(dataset.train_tsv), val_data=str(dataset.val_tsv),
                    targets_dir=str(targets), out_dir=str(out_dir), batch_size=16, warmup_steps=10,
                    num_workers=0, log_every=1, progress=False, tensorboard=False)
    return TrainConfig(**{**settings, **overrides})


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained(tiny_dir, data, tmp_path_factory) -> TrainResult:
    """200 steps of 16 pairs from fresh adapters (about 25 s on two busy cores), validated at 100 and 200."""
    out = tmp_path_factory.mktemp("run") / "run"
    return train(config(tiny_dir, data, out, steps=200, log_every=20, val_every=100, save_every=100))


def test_losses_fall_and_retrieval_beats_chance(trained: TrainResult):
    log = rows(trained.out_dir / "metrics.csv")
    assert [int(r["step"]) for r in log] == list(range(20, 201, 20))
    first, last = log[0], log[-1]
    for name in ("loss", "contrastive", "generation_l2"):
        assert float(last[name]) < 0.8 * float(first[name]), (name, first[name], last[name])
    for name in ("caption_ce", "img_token_ce"):  # a random frozen LM: the prefix and [IMG] rows move them little
        assert float(last[name]) < float(first[name]), name
    validation = rows(trained.out_dir / "validation.csv")
    assert [int(r["step"]) for r in validation] == [100, 200]
    final = validation[-1]
    chance = 1 / VAL_PAIRS
    assert int(final["samples"]) == VAL_PAIRS
    assert float(final["text_to_image_top1"]) >= 8 * chance, final  # measured 0.625: 20x chance
    assert float(final["image_to_text_top1"]) >= 4 * chance, final
    assert float(final["text_to_image_top5"]) >= float(final["text_to_image_top1"])
    assert trained.best_text_to_image_top1 == max(float(r["text_to_image_top1"]) for r in validation)
    assert trained.best_dir is not None and (trained.best_dir / ADAPTERS_FILE).is_file()
    assert trained.steps == 200 and trained.skipped_samples == 0 and trained.nonfinite_steps == 0
    assert trained.losses["loss"] == pytest.approx(float(last["loss"]), rel=1e-6)


def test_two_processes_give_the_loss_curve_of_one(tiny_dir, data, tmp_path):
    """torchrun with 2 gloo processes of 8 pairs against one process of 16, the same global batches.

    Tolerance: 1e-5 relative on every loss and the gradient norm for 6 steps. Measured: below 3e-7, float32
    reduction order; the contrastive gradient is made world-size independent by the trainer. Concatenation is
    off because it pairs captions within a process's micro-batch; the shapes captions all have 8 tokens, so
    per-process caption means average to the global one exactly.
    """
    settings = dict(steps=6, concat_captions_prob=0.0, val_max_samples=16, val_every=3, save_every=3)
    single = config(tiny_dir, data, tmp_path / "one", **settings)
    dataset, targets = data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gill.cli", "train", "--checkpoint", str(tiny_dir), "--train-data", str(dataset.train_tsv),
               "--val-data", str(dataset.val_tsv), "--targets-dir", str(targets), "--out-dir", str(tmp_path / "two"),
               "--batch-size", "16", "--warmup-steps", "10", "--num-workers", "0", "--log-every", "1",
               "--steps", "6", "--concat-captions-prob", "0", "--val-max-samples", "16", "--val-every", "3",
               "--save-every", "3", "--quiet", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train(single)  # meanwhile, in this process
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["world_size"] == 2
    one, two = rows(tmp_path / "one" / "metrics.csv"), rows(tmp_path / "two" / "metrics.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [str(s) for s in range(1, 7)]
    for a, b in zip(one, two, strict=True):
        for name in LOSS_COLUMNS:
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-5), (a["step"], name)
    # Validation is split over the ranks and gathered: the same pairs, the same scores.
    val_one, val_two = rows(tmp_path / "one" / "validation.csv"), rows(tmp_path / "two" / "validation.csv")
    assert [r["samples"] for r in val_two] == ["16", "16"]
    for a, b in zip(val_one, val_two, strict=True):
        for name in ("text_to_image_top1", "image_to_text_top5", "caption_ce", "generation_l2"):
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-6), name
    assert load_state(tmp_path / "two" / "train_state.pt")["world_size"] == 2


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_dir, data, tmp_path):
    """Interrupted after 3 of 6 steps and resumed: the same losses and bitwise the same adapters (CPU, one
    process). Caption concatenation is on (its generator is restored) and validation runs in between."""
    settings = dict(steps=6, batch_size=8, val_max_samples=8, val_every=2, save_every=2, concat_captions_prob=0.5)
    full = train(config(tiny_dir, data, tmp_path / "full", **settings))
    part = config(tiny_dir, data, tmp_path / "part", **{**settings, "steps": 3})
    train(part)
    with pytest.raises(InputError, match="pass --resume"):
        train(part)
    with pytest.raises(InputError, match="batch_size 8 -> 16"):
        train(replace(part, steps=6, resume=True, batch_size=16))
    resumed = train(replace(part, steps=6, resume=True))
    assert (resumed.start_step, resumed.steps, full.steps) == (3, 6, 6)
    columns = ["step", *LOSS_COLUMNS, "lr"]
    assert [[r[c] for c in columns] for r in rows(tmp_path / "part" / "metrics.csv")] == \
        [[r[c] for c in columns] for r in rows(full.out_dir / "metrics.csv")]
    saved, expected = load_state(resumed.state_path), load_state(full.state_path)
    assert saved["step"] == 6
    assert saved["ranks"][0]["data_position"] == expected["ranks"][0]["data_position"]
    for key, value in expected["adapters"].items():
        assert torch.equal(saved["adapters"][key], value), key
    exported = load_file(str(resumed.export_dir / ADAPTERS_FILE))
    assert all(torch.equal(exported["model." + k], v) for k, v in expected["adapters"].items())


def test_failed_samples_are_skipped_and_counted(tiny_dir, data, tmp_path):
    """12 of 16 rows name missing images: their samples are dropped from their batches (not replaced), a batch
    left with none is skipped, and the run still takes its steps."""
    dataset, _ = data
    lines = dataset.train_tsv.read_text().splitlines()
    broken = [lines[0]] + [line if i % 4 == 0 else line.replace("images/", "images/missing-")
                           for i, line in enumerate(lines[1:17])]
    tsv = tmp_path / "broken.tsv"
    tsv.write_text("\n".join(broken) + "\n")
    result = train(replace(config(tiny_dir, data, tmp_path / "run", steps=4, batch_size=2, val_data=None,
                                  targets_dir=None), train_data=str(tsv), image_dir=str(dataset.root)))
    assert result.steps == 4 and result.skipped_batches >= 1
    assert result.skipped_by_reason == {"missing_image": result.skipped_samples}
    last = rows(tmp_path / "run" / "metrics.csv")[-1]
    assert int(last["skipped_samples"]) == result.skipped_samples
    assert int(last["skipped_batches"]) == result.skipped_batches
    assert "generation_l2" not in last and result.best_dir is None


def test_export_loads_in_process_and_through_gill_run(trained: TrainResult, tiny_dir, tmp_path):
    export = trained.export_dir
    verify_checkpoint(export, full=True)
    args = json.loads((export / "model_args.json").read_text())
    assert args["opt_version"] == str((tiny_dir / "lm").resolve())  # base models found from anywhere
    info = json.loads((export / "training.json").read_text())
    assert info["step"] == 200 and info["retrieval_corpus_entries"] > 0
    # The corpus was re-embedded with the trained visual_fc: the same images, new vectors.
    with np.load(export / EMBEDDINGS_FILE) as new, np.load(tiny_dir / EMBEDDINGS_FILE) as old:
        assert new["embeddings"].shape == old["embeddings"].shape
        assert not np.allclose(new["embeddings"], old["embeddings"])
        assert all(Path(url).is_file() for url in new["urls"])

    components = LocalComponents.from_checkpoint(export, device="cpu")
    trained_fc = load_file(str(export / ADAPTERS_FILE))["model.visual_fc.weight"]
    assert torch.equal(components.model.adapters.visual_fc.weight, trained_fc)
    result = Pipeline(components).run([PROMPT], IMAGE_TURN)
    assert isinstance(result.done, Done) and result.done.generated_tokens == 6
    assert len(result.images) == 1 and isinstance(result.images[0], ImageResult)

    command = [sys.executable, "-m", "gill.cli", "run", "show me a red circle", "--checkpoint", str(export),
               "--out", str(tmp_path), "--max-new-tokens", "6", "--gen-scale-factor", "100000",
               "--min-word-tokens", "2", "--steps", "2", "--device", "cpu"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "image 0:" in completed.stdout and list(tmp_path.glob("turn1-image0-*.png"))


@pytest.mark.slow
def test_export_serves_through_triton(trained: TrainResult):
    """One tritonserver start (about a minute on two busy cores) on the export, one turn over gRPC."""
    from gill.serving.server import TritonServer
    from gill_client import ChatOptions, GillClient

    with TritonServer(trained.export_dir) as server, GillClient(server.endpoints.grpc) as client:
        reply = client.chat("show me a red circle", ChatOptions(max_new_tokens=6, gen_scale_factor=1e5,
                                                                min_word_tokens=2, num_inference_steps=2)).collect()
    assert reply.done.generated_tokens == 6
    assert len(reply.images) == 1 and reply.images[0].source in ("retrieved", "generated")


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


def test_training_commands(tiny_dir, tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    made = runner.invoke(app, ["make-shapes-data", str(data), "--train", "32", "--val", "8", "--shards"])
    assert made.exit_code == 0, made.output
    assert (data / "train.tsv").is_file() and "train shards:" in made.stdout

    # Training reads the shards (keys train-000000 ...), validation the TSV (keys images/val-000000.png ...).
    shards = str(data / "shards" / "train-{000000..000000}.tar")
    targets = tmp_path / "targets"
    for source in (shards, str(data / "val.tsv")):
        done = runner.invoke(app, ["preprocess-sd-targets", source, "--checkpoint", str(tiny_dir), "--out",
                                   str(targets), "--quiet"])
        assert done.exit_code == 0, done.output
    assert len(list(targets.glob("*.npy"))) == 40

    out = tmp_path / "run"
    arguments = ["train", "--checkpoint", str(tiny_dir), "--train-data", shards, "--val-data", str(data / "val.tsv"),
                 "--targets-dir", str(targets), "--out-dir", str(out), "--steps", "3", "--batch-size", "8",
                 "--num-workers", "0", "--log-every", "1", "--quiet"]
    trained = runner.invoke(app, arguments)
    assert trained.exit_code == 0, trained.output
    result = _json(trained.stdout)
    assert result["steps"] == 3 and result["validation"]["samples"] == 8 and (out / "tensorboard").is_dir()
    assert len(rows(out / "metrics.csv")) == 3 and (out / "export" / ADAPTERS_FILE).is_file()
    again = runner.invoke(app, arguments)
    assert again.exit_code == 2 and "--resume" in again.output
    uneven = runner.invoke(app, [*arguments, "--resume", "--batch-size", "7"])
    assert uneven.exit_code == 2 and "batch_size 8 -> 7" in uneven.output

    annotations = tmp_path / "decisions.tsv"
    lines = ["Prompt\tDecisions"] + [f"a photo of a real {w}\tret,ret,ret,ret,ret" if i % 2 else
                                     f"an imaginative painting of a {w}\tgen,gen,gen,gen,gen"
                                     for i, w in enumerate(["cat", "dog", "tree", "car", "boat", "bird"] * 2)]
    annotations.write_text("\n".join(lines) + "\n")
    decided = runner.invoke(app, ["train-decision", str(out / "export"), str(annotations), "--train-size", "8",
                                  "--steps", "20", "--quiet", "--device", "cpu"])
    assert decided.exit_code == 0, decided.output
    metrics = _json(decided.stdout)
    assert metrics["class_counts"]["validation"] == {"gen": 2, "ret": 2}
    assert "macro-F1" in decided.output and metrics["path"] == str(out / "export" / "decision_model.safetensors")
    verify_checkpoint(out / "export", full=True)  # the new head was recorded in SHA256SUMS


def test_corpus_bleu_follows_the_definition():
    assert corpus_bleu(["a red circle on a blue background"], ["a red circle on a blue background"]) == [1.0] * 4
    # 4 of 5 unigrams, 3 of 4 bigrams, 2 of 3 trigrams, 1 of 2 4-grams; the hypothesis is shorter (5 vs 6 tokens).
    scores = corpus_bleu(["a red circle on green"], ["a red circle on a blue"])
    brevity = np.exp(1 - 6 / 5)
    assert scores[0] == pytest.approx(brevity * 4 / 5)
    assert scores[3] == pytest.approx(brevity * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert corpus_bleu(["x y z"], ["a b c"]) == [0.0] * 4


def test_training_benchmark_runs_its_paper_scale_code_on_a_cpu():
    """bench/train.py --paper-scale with the tiny shapes: the code a GPU runs at OPT-6.7B scale, in seconds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import train as bench  # bench/train.py

    results = bench.main(["--paper-scale", "--shapes", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1",
                          "--warmup", "0"])
    assert [r.mode.checkpointing for r in results] == [False, True]
    assert all(r.samples_per_s > 0 and r.peak_gib is None for r in results)
