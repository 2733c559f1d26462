"""`gill eval visdial` on a synthetic VisDial v1.0 val split (official format), tiny checkpoint and tiny CLIP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.evaluation.fixtures import make_random_alexnet, make_tiny_clip
from gill.evaluation.metrics import ClipSimilarity
from gill.evaluation.visdial import VisdialSettings, dialog_prompt, evaluate_visdial
from gill.evaluation.visdial_data import VisdialImages, read_visdial, write_visdial_fixture

DIALOGS = 4  # the last lacks its image on disk, the one before has a corrupt file


@pytest.fixture(scope="module")
def visdial(tmp_path_factory) -> Path:
    return write_visdial_fixture(tmp_path_factory.mktemp("visdial"), dialogs=DIALOGS, missing=1, unreadable=1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_reader_parses_the_official_format(visdial):
    split = read_visdial(visdial)
    assert (split.version, split.split, len(split.dialogs)) == ("1.0", "val", DIALOGS)
    raw = json.loads(visdial.read_text())["data"]
    first = raw["dialogs"][0]
    dialog = split.dialogs[0]
    assert dialog.image_id == first["image_id"] and dialog.caption == first["caption"]
    assert len(dialog.rounds) == 10
    assert dialog.rounds[3] == (raw["questions"][first["dialog"][3]["question"]],
                                raw["answers"][first["dialog"][3]["answer"]])


def test_prompt_is_the_reference_format(visdial):
    dialog = read_visdial(visdial).dialogs[0]
    (q1, a1), (q2, a2) = dialog.rounds[:2]
    assert dialog_prompt(dialog, 1) == f"Q: {q1}?\nA: {a1}"
    assert dialog_prompt(dialog, 2) == f"Q: {q1}?\nA: {a1}\nQ: {q2}?\nA: {a2}"
    assert dialog_prompt(dialog, 10).count("\n") == 19 and "Q: what shape is it?" in dialog_prompt(dialog, 10)
    assert dialog_prompt(dialog, 1, include_caption=True) == f"{dialog.caption}\nQ: {q1}?\nA: {a1}"
    with pytest.raises(InputError, match="has 10 rounds, 11 asked"):
        dialog_prompt(dialog, 11)


def test_image_folder_finds_each_naming_and_counts_problems(tmp_path, visdial):
    split = read_visdial(visdial)
    folder = VisdialImages(visdial.parent / "VisualDialog_val2018", split.split)
    ids = [str(d.image_id) for d in split.dialogs]
    assert folder.load(ids[0]).size == (64, 64)  # VisualDialog_val2018_<12 digits>.jpg
    assert folder.load(ids[-2]) is None and folder.load(ids[-1]) is None
    assert folder.summary() == {"missing": 1, "unreadable": 1}
    assert folder.problems[ids[-1]] == "missing" and folder.problems[ids[-2]].startswith("unreadable")
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8), "red").save(plain / "42.png")
    Image.new("RGB", (9, 9), "red").save(plain / "000000000043.jpg")
    other = VisdialImages(plain)
    assert other.load("42").size == (8, 8) and other.load("43").size == (9, 9) and other.load("44") is None
    with pytest.raises(InputError, match="VisualDialog_val2018_<12-digit id>.jpg"):
        VisdialImages(tmp_path / "absent")


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_reader_errors_name_the_file_and_the_entry(tmp_path, visdial):
    good = json.loads(visdial.read_text())
    with pytest.raises(InputError, match=r"bad\.json: not a readable JSON file"):
        read_visdial(_write(tmp_path, "{not json"))
    with pytest.raises(InputError, match="no such file"):
        read_visdial(tmp_path / "absent.json")
    with pytest.raises(InputError, match=r"bad\.json: no top-level object with a 'data' object.*VisDial v1\.0"):
        read_visdial(_write(tmp_path, {"dialogs": []}))
    broken = json.loads(json.dumps(good))
    broken["data"]["dialogs"][1]["dialog"][2]["question"] = 999
    with pytest.raises(InputError, match=r"bad\.json: data\.dialogs\[1\]\.dialog\[2\]\.question=999 is out of "
                                         r"range: data\.questions has 10 entries"):
        read_visdial(_write(tmp_path, broken))
    broken = json.loads(json.dumps(good))
    broken["data"]["dialogs"][2]["image_id"] = "abc"
    with pytest.raises(InputError, match=r"data\.dialogs\[2\]\.image_id must be a non-negative integer"):
        read_visdial(_write(tmp_path, broken))
    broken = json.loads(json.dumps(good))
    del broken["data"]["dialogs"][0]["dialog"][4]["answer"]
    with pytest.raises(InputError, match=r"dialog\[4\] has no 'answer' but is not the dialog's last round"):
        read_visdial(_write(tmp_path, broken))
    broken = json.loads(json.dumps(good))
    del broken["data"]["answers"]
    with pytest.raises(InputError, match="data.answers must be a list"):
        read_visdial(_write(tmp_path, broken))


def test_test_split_last_round_without_answer_ends_the_dialog(tmp_path, visdial):
    data = json.loads(visdial.read_text())
    data["split"] = "test"
    del data["data"]["dialogs"][0]["dialog"][9]["answer"]
    assert len(read_visdial(_write(tmp_path, data)).dialogs[0].rounds) == 9


def test_evaluation_feeds_the_first_k_rounds_and_skips_dialogs_it_cannot_score(tmp_path, visdial, clip_dir):
    """A recording generator: the protocol without diffusion. Dialog 1 is cut to 4 rounds (too few for 5)."""
    data = json.loads(visdial.read_text())
    data["data"]["dialogs"][1]["dialog"] = data["data"]["dialogs"][1]["dialog"][:4]
    split = read_visdial(_write(tmp_path, data))
    folder = VisdialImages(visdial.parent / "VisualDialog_val2018")
    target = folder.load(str(split.dialogs[0].image_id))
    calls = []

    def generate(parts, options):
        calls.append((parts, options))
        return target  # the dialog's own photo: CLIP similarity 1

    clip = ClipSimilarity.from_directory(clip_dir, device="cpu")
    body = evaluate_visdial(split, folder, generate, clip, None, VisdialSettings(rounds=(1, 5)), progress=False)
    assert body["counts"] == {"dialogs": 4, "evaluated": 1, "skipped_too_few_rounds": 1, "skipped_missing_images": 2,
                              "images_missing": 1, "images_unreadable": 1}
    assert [parts for parts, _ in calls] == [[dialog_prompt(split.dialogs[0], 1)], [dialog_prompt(split.dialogs[0], 5)]]
    assert all(o.gen_scale_factor == 1e5 and o.max_new_tokens == 2 and o.seed == 42 and not o.allow_retrieval
               for _, o in calls)
    for rounds in ("1", "5"):
        assert body["results"][rounds]["scored"] == 1 and body["results"][rounds]["lpips"] is None
        assert body["results"][rounds]["clip_similarity"]["mean"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InputError, match="round counts >= 1"):
        VisdialSettings(rounds=(0,))
    with pytest.raises(InputError, match="each round count once"):
        VisdialSettings(rounds=(5, 5))


def test_eval_visdial_end_to_end(tmp_path, visdial, clip_dir, tiny_dir):
    alexnet = make_random_alexnet(tmp_path / "alexnet-random.pth")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "eval", "visdial", str(visdial), "--checkpoint", str(tiny_dir), "--clip", str(clip_dir),
        "--lpips-alexnet", str(alexnet), "--out", str(out), "--steps", "2", "--device", "cpu", "--quiet",
        "--rounds", "1", "--rounds", "10"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["eval"] == "visdial" and data["dataset"]["name"] == "VisDial v1.0 val"
    assert data["checkpoint"]["sha256sums_sha256"] == hashlib.sha256((tiny_dir / "SHA256SUMS").read_bytes()).hexdigest()
    assert data["counts"] == {"dialogs": 4, "evaluated": 2, "skipped_too_few_rounds": 0, "skipped_missing_images": 2,
                              "images_missing": 1, "images_unreadable": 1}
    assert data["settings"]["rounds"] == [1, 10] and data["settings"]["include_caption"] is False
    assert data["settings"]["options"]["gen_scale_factor"] == 1e5 and data["settings"]["seed"] == 42
    dialogs = read_visdial(visdial).dialogs
    for rounds in ("1", "10"):
        row = data["results"][rounds]
        assert row["scored"] == 2 and row["no_image"] == 0
        assert -1 <= row["clip_similarity"]["mean"] <= 1 and row["lpips"]["mean"] >= 0
        names = sorted(p.name for p in (out / "generated" / f"rounds-{rounds}").glob("*.png"))
        assert names == sorted(f"{d.image_id:012d}.png" for d in dialogs[:2])
    assert len(data["dialogs"]) == 4 and data["metrics"]["lpips"]["alexnet_is_torchvision_imagenet"] is False
    markdown = (out / "result.md").read_text()
    assert "| 10 | " in markdown and "0.645" in markdown and "0.714" in markdown and "0.528" in markdown
    assert "1 missing, 1 unreadable" in markdown and "no caption" in markdown


def test_eval_visdial_refuses_bad_input_before_loading_the_model(tmp_path, visdial, clip_dir, tiny_dir):
    bad = _write(tmp_path, {"data": {"questions": [], "answers": []}})
    result = CliRunner().invoke(app, ["eval", "visdial", str(bad), "--checkpoint", str(tiny_dir),
                                      "--clip", str(clip_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "bad.json" in result.output and "data.dialogs must be a list" in result.output
    result = CliRunner().invoke(app, ["eval", "visdial", str(visdial), "--checkpoint", str(tiny_dir),
                                      "--clip", str(clip_dir), "--rounds", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "round counts >= 1" in result.output
