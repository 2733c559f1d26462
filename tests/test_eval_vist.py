"""`gill eval vist` and `gill eval retrieval` on a synthetic VIST SIS split (official format), tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from wire import API_KEY

from gill.cli import app
from gill.errors import InputError
from gill.evaluation.datasets import ImageFolder, read_vist_sis, write_vist_fixture
from gill.evaluation.fixtures import make_random_alexnet, make_tiny_clip
from gill.evaluation.generation import load_metrics, pipeline_generator
from gill.evaluation.vist import VistSettings, evaluate_vist, story_parts
from gill.serving.server import free_port

STORIES = 3  # the last one lacks a photo on disk


@pytest.fixture(scope="module")
def vist(tmp_path_factory) -> Path:
    return write_vist_fixture(tmp_path_factory.mktemp("vist"), stories=STORIES, missing=1)


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("metric-models")
    return make_tiny_clip(root / "clip"), make_random_alexnet(root / "alexnet-random.pth")


def test_reader_parses_the_official_format(vist):
    split = read_vist_sis(vist)
    assert len(split.stories) == STORIES
    story = split.stories[0]
    assert [item.order for item in story.items] == [0, 1, 2, 3, 4]
    assert story.captions[0].startswith("the ") and len(story.image_ids) == 5
    assert split.image_urls[story.image_ids[0]].startswith("https://")
    folder = ImageFolder(vist.parent / "val_images")
    assert all(folder.load(i) is not None for i in story.image_ids)
    assert folder.load(split.stories[-1].image_ids[2]) is None
    assert folder.summary() == {"missing": 1, "unreadable": 0}


def test_reader_orders_by_worker_arranged_photo_order_and_rejects_bad_files(tmp_path, vist):
    data = json.loads(vist.read_text())
    data["annotations"] = data["annotations"][:5][::-1]  # one story, sentences reversed in the file
    (tmp_path / "reversed.json").write_text(json.dumps(data))
    story = read_vist_sis(tmp_path / "reversed.json").stories[0]
    assert [item.order for item in story.items] == [0, 1, 2, 3, 4]
    data["annotations"][2] = [{"story_id": "1"}]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"annotations\[2\] lacks"):
        read_vist_sis(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no such file"):
        read_vist_sis(tmp_path / "absent.json")


def test_story_parts_of_each_context(vist):
    story = read_vist_sis(vist).stories[0]
    images = [Image.new("RGB", (4, 4)) for _ in range(4)]
    assert story_parts(story, images, "caption") == [story.captions[-1]]
    assert story_parts(story, images, "captions") == story.captions
    parts = story_parts(story, images, "captions-images")
    assert len(parts) == 9 and parts[-1] == story.captions[-1]
    assert [type(p) for p in parts[:2]] == [str, Image.Image]
    with pytest.raises(InputError, match="choose one or more"):
        VistSettings(contexts=("five",))
    options = VistSettings().options()
    assert (options.max_new_tokens, options.gen_scale_factor, options.seed) == (2, 1e5, 42)  # the reference's


def test_eval_vist_end_to_end(tmp_path, vist, metric_models, tiny_dir):
    clip_dir, alexnet = metric_models
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "eval", "vist", str(vist), "--checkpoint", str(tiny_dir), "--clip", str(clip_dir),
        "--lpips-alexnet", str(alexnet), "--out", str(out), "--steps", "2", "--device", "cpu", "--quiet",
        "--context", "captions-images", "--context", "caption"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["checkpoint"]["sha256sums_sha256"] == hashlib.sha256((tiny_dir / "SHA256SUMS").read_bytes()).hexdigest()
    assert data["counts"] == {"stories": 3, "evaluated": 2, "skipped_missing_images": 1, "images_missing": 1,
                              "images_unreadable": 0}
    assert data["settings"]["seed"] == 42 and data["settings"]["options"]["gen_scale_factor"] == 1e5
    assert data["versions"]["lpips"] and data["metrics"]["lpips"]["alexnet_is_torchvision_imagenet"] is False
    for context in ("captions-images", "caption"):
        row = data["results"][context]
        assert row["scored"] == 2 and row["no_image"] == 0
        assert -1 <= row["clip_similarity"]["mean"] <= 1 and row["lpips"]["mean"] >= 0
        assert len(list((out / "generated" / context).glob("*.png"))) == 2
    assert len(data["stories"]) == 4
    markdown = (out / "result.md").read_text()
    assert "0.641" in markdown and "5 captions + 4 images" in markdown and "not comparable" in markdown
    # grid.png: the 2 evaluated stories x (4 context photos, 2 generated, truth) at 128 px (gill.evaluation.plots)
    assert Image.open(out / "grid.png").size == (7 * 128, 20 + 2 * (16 + 128))


def test_eval_vist_refuses_a_clip_without_projection(tmp_path, vist, tiny_dir):
    result = CliRunner().invoke(app, ["eval", "vist", str(vist), "--checkpoint", str(tiny_dir),
                                      "--clip", str(tiny_dir / "clip"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "visual_projection" in result.output


def test_eval_vist_served_through_the_client_equals_in_process(tmp_path, vist, metric_models, server, pipeline):
    """`--url`: the served model (tiny checkpoint + a decision head; retrieval is off, so the same images) gets
    the reference's raw prompt over the wire (Options.raw_text) and returns what the pipeline makes in-process."""
    clip_dir, alexnet = metric_models
    out = tmp_path / "served"
    result = CliRunner().invoke(app, [
        "eval", "vist", str(vist), "--url", server.endpoints.grpc, "--api-key", API_KEY, "--clip", str(clip_dir),
        "--lpips-alexnet", str(alexnet), "--out", str(out), "--steps", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert "checkpoint" not in data
    served = data["served"]
    assert served["served"] is True and served["url"] == server.endpoints.grpc and served["model"] == "gill"
    assert served["server"]["name"] == "triton" and served["server"]["model_versions"] == ["1"]
    assert served["server"]["checkpoint"] == str(server.checkpoint.resolve())
    assert data["counts"] == {"stories": 3, "evaluated": 2, "skipped_missing_images": 1, "images_missing": 1,
                              "images_unreadable": 0}
    row = data["results"]["captions-images"]
    assert row["scored"] == 2 and row["no_image"] == 0
    assert f"Served by `{server.endpoints.grpc}`" in (out / "result.md").read_text()

    prompts = []

    def in_process(parts, options):
        prompts.append(parts)
        return pipeline_generator(pipeline)(parts, options)

    metric, distance = load_metrics(clip_dir, alexnet, "cpu")
    settings = VistSettings(num_inference_steps=2)
    evaluate_vist(read_vist_sis(vist), ImageFolder(vist.parent / "val_images"), in_process, metric, distance,
                  settings, tmp_path / "local", progress=False)
    names = sorted(path.name for path in (out / "generated" / "captions-images").glob("*.png"))
    assert len(names) == 2
    for name in names:
        got = np.asarray(Image.open(out / "generated" / "captions-images" / name))
        assert np.array_equal(got, np.asarray(Image.open(tmp_path / "local" / "generated" / "captions-images" / name)))
    # the dialogue format's wrapping changes the image: equality above shows the prompt went unwrapped
    wrapped = [f"Q: {part}\nA:" if isinstance(part, str) else part for part in prompts[0]]
    other = pipeline_generator(pipeline)(wrapped, settings.options())
    assert not np.array_equal(np.asarray(other), np.asarray(Image.open(out / "generated" / "captions-images" /
                                                                       names[0])))


def test_eval_vist_needs_exactly_one_model_and_a_reachable_server(tmp_path, vist, metric_models, tiny_dir):
    clip_dir, _ = metric_models
    base = ["eval", "vist", str(vist), "--clip", str(clip_dir), "--out", str(tmp_path), "--quiet"]
    neither = CliRunner().invoke(app, base)
    assert neither.exit_code == 2 and "exactly one of --checkpoint DIR" in neither.output
    assert "got neither" in neither.output
    both = CliRunner().invoke(app, base + ["--checkpoint", str(tiny_dir), "--url", "localhost:1"])
    assert both.exit_code == 2 and "got both" in both.output
    nobody = f"127.0.0.1:{free_port('127.0.0.1')}"
    unreachable = CliRunner().invoke(app, base + ["--url", nobody])
    assert unreachable.exit_code == 2 and f"no GILL server ready at {nobody}" in unreachable.output
    assert not (tmp_path / "result.json").exists()


def test_eval_retrieval_end_to_end(tmp_path, vist, tiny_dir):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "retrieval", str(vist), "--checkpoint", str(tiny_dir), "--out", str(out),
                                      "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["counts"]["candidates"] == 5 * STORIES - 1 and data["counts"]["evaluated"] == 2
    row = data["results"]["captions-images"]
    assert row["queries"] == 2 and row["no_query"] == 0
    assert 0 <= row["recall"]["r@1"] <= row["recall"]["r@5"] <= row["recall"]["r@10"] == 100.0  # 14 candidates - 4
    for story in data["stories"]:
        context_ids = set(read_vist_sis(vist).stories[int(story["story_id"]) - 50_000].image_ids[:4])
        assert not context_ids & set(story["top10"])  # the context photos are never retrieved
    assert "20.3" in (out / "result.md").read_text()
