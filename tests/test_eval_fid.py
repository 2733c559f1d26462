"""`gill eval fid`: clean-fid's feature path with a stand-in extractor, checked against an independent numpy/scipy
FID, the cached reference statistics, clean-fid's Inception wrapper on a tiny TorchScript, and the CLI (score a
folder; generate from MS-COCO-format captions on the tiny checkpoint).

The stand-in extractor is the mean colour of each image. On solid-colour images every resize keeps the colour, so
the features, and so the FID, are known without running clean-fid at all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.evaluation import fid


class MeanColour:
    """``[B, 3, 299, 299]`` pixels in [0, 255] -> ``[B, 3]`` mean colour; counts the images it has seen."""

    def __init__(self) -> None:
        self.seen = 0
        self.sizes: set[tuple[int, ...]] = set()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.seen += batch.shape[0]
        self.sizes.add(tuple(batch.shape[1:]))
        return batch.double().mean(dim=(2, 3))

    def describe(self) -> dict:
        return {"id": "mean-colour", "implementation": "test stand-in: mean colour"}


def solid_folder(directory: Path, count: int, seed: int, size=(40, 30)) -> np.ndarray:
    """``count`` solid-colour PNGs; returns their colours ``[count, 3]`` (what MeanColour must find)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    colours = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(count)], dtype=np.float64)
    for index, colour in enumerate(colours):
        Image.new("RGB", size, tuple(int(c) for c in colour)).save(directory / f"{index:03d}.png")
    return colours


def independent_fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """FID straight from its definition, with numpy and scipy only."""
    mu_1, mu_2 = features_1.mean(0), features_2.mean(0)
    sigma_1, sigma_2 = np.cov(features_1.T), np.cov(features_2.T)
    root = linalg.sqrtm(sigma_1 @ sigma_2).real
    return float(np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1 + sigma_2 - 2 * root))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, np.ndarray, Path, np.ndarray]:
    root = tmp_path_factory.mktemp("fid")
    return (root / "real", solid_folder(root / "real", 14, seed=1), root / "fake",
            solid_folder(root / "fake", 10, seed=2, size=(64, 64)))


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu_1, mu_2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    std_1, std_2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])
    expected = np.sum((mu_1 - mu_2) ** 2) + np.sum((std_1 - std_2) ** 2)  # 5 + 5
    assert fid.frechet_distance(mu_1, np.diag(std_1 ** 2), mu_2, np.diag(std_2 ** 2)) == pytest.approx(expected)
    with pytest.raises(InputError, match="FID could not be computed"):
        fid.frechet_distance(mu_1, np.eye(3), mu_2[:2], np.eye(2))


def test_features_go_through_clean_fid_and_fid_matches_an_independent_computation(tmp_path, folders):
    real, real_colours, fake, fake_colours = folders
    extractor = MeanColour()
    features = fid.folder_features(fid.image_files(fake, "fake"), extractor, progress=False)
    np.testing.assert_allclose(features, fake_colours, atol=1e-3)
    assert extractor.sizes == {(3, 299, 299)}  # clean-fid's clean resize ran before the extractor
    body = fid.fid_against_reference(fake, real, extractor, "clean", tmp_path / "cache", progress=False)
    assert body["fid"] == pytest.approx(independent_fid(fake_colours, real_colours), rel=1e-4)
    assert body["fid"] > 100  # two unrelated colour sets: far apart
    assert (body["generated_images"], body["reference"]["images"]) == (10, 14)
    assert body["generated_sizes"] == {"64x64": 10}
    same = fid.fid_against_reference(real, real, MeanColour(), "clean", tmp_path / "cache", progress=False)
    assert abs(same["fid"]) < 1e-6


def test_reference_statistics_are_computed_once_and_reused(tmp_path, folders):
    real, real_colours, fake, _ = folders
    cache = tmp_path / "cache"
    first = MeanColour()
    body = fid.fid_against_reference(fake, real, first, "clean", cache, progress=False)
    assert body["reference"]["cached"] is False and first.seen == 14 + 10
    stats = Path(body["reference"]["stats_file"])
    with np.load(stats) as stored:  # clean-fid's layout: mu, sigma
        np.testing.assert_allclose(stored["mu"], real_colours.mean(0), atol=1e-3)
        assert stored["sigma"].shape == (3, 3)
    second = MeanColour()
    again = fid.fid_against_reference(fake, real, second, "clean", cache, progress=False)
    assert again["reference"]["cached"] is True and second.seen == 10  # the real images were not read again
    assert again["fid"] == body["fid"]
    changed = tmp_path / "real-changed"
    changed.mkdir()
    for file in real.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    Image.new("RGB", (8, 8), (1, 2, 3)).save(changed / "extra.png")
    third = MeanColour()
    body = fid.fid_against_reference(fake, changed, third, "clean", cache, progress=False)
    assert body["reference"]["cached"] is False and third.seen == 15 + 10
    legacy = MeanColour()  # another mode is another statistic (legacy_tensorflow: resized inside the network)
    fid.fid_against_reference(real, real, legacy, "legacy_tensorflow", cache, progress=False)
    assert legacy.seen == 14 + 14 and legacy.sizes == {(3, 30, 40)}
    with pytest.raises(InputError, match="legacy_tensorflow needs images of one size"):
        fid.fid_against_reference(fake, changed, MeanColour(), "legacy_tensorflow", cache, progress=False)


def test_bad_folders_and_modes_are_refused(tmp_path, folders):
    real = folders[0]
    with pytest.raises(InputError, match="no such directory"):
        fid.image_files(tmp_path / "absent", "--reference")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(InputError, match="1 images found; FID needs at least 2"):
        fid.image_files(tmp_path / "one", "--reference")
    (tmp_path / "one" / "b.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="an image could not be read.*b.png"):
        fid.fid_against_reference(real, tmp_path / "one", MeanColour(), "clean", tmp_path / "cache", progress=False)
    with pytest.raises(InputError, match="choose clean or legacy_tensorflow"):
        fid.check_mode("legacy_pytorch")


class _Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).flatten(1)  # 32 x 8 x 8 = 2048, the Inception's pool3 width


class _TinyInception(torch.nn.Module):
    """The interface of clean-fid's TorchScript Inception: ``layers`` (on normalised 299x299 input) and forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_loads_from_a_local_file_through_clean_fids_wrapper(tmp_path):
    with pytest.raises(InputError, match=r"no such file.*inception-2015-12-05\.pt.*give its path"):
        fid.InceptionFeatures.from_file(tmp_path / "inception-2015-12-05.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not clean-fid's TorchScript Inception"):
        fid.InceptionFeatures.from_file(tmp_path / "junk.pt")
    torch.manual_seed(0)
    module = _TinyInception().eval()
    torch.jit.script(module).save(str(tmp_path / "tiny.pt"))
    extractor = fid.InceptionFeatures.from_file(tmp_path / "tiny.pt", "clean", "cpu")
    pixels = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        expected = module.layers((pixels - 128) / 128)  # clean-fid's normalisation
    torch.testing.assert_close(extractor(pixels), expected)
    assert extractor.describe()["sha256"] == fid._sha256(tmp_path / "tiny.pt")


def test_coco_captions_reader_and_sampling(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"annotations": [{"id": i, "image_id": 100 + i, "caption": f" a cat {i} "}
                                                for i in range(10)], "images": []}))
    captions = fid.read_coco_captions(path)
    assert len(captions) == 10 and captions[3].caption == "a cat 3" and captions[3].image_id == 103
    sample = fid.sample_captions(captions, 4, seed=7)
    assert len({c.id for c in sample}) == 4 and sample == fid.sample_captions(captions, 4, seed=7)
    assert sample != fid.sample_captions(captions, 4, seed=8)
    assert fid.sample_captions(captions, 30_000, seed=7) == captions
    path.write_text(json.dumps({"annotations": [{"id": 1, "image_id": 2}]}))
    with pytest.raises(InputError, match=r"captions\.json: annotations\[0\] must be an object with id"):
        fid.read_coco_captions(path)
    path.write_text("[]")
    with pytest.raises(InputError, match="MS-COCO captions format"):
        fid.read_coco_captions(path)


def test_generation_seeds_each_caption_and_refuses_to_mix_runs(tmp_path):
    captions = [fid.CocoCaption(i, i, f"caption {i}") for i in (5, 9, 11)]
    seen = []

    def generate(parts, options):
        seen.append((parts, options.seed, options.gen_scale_factor))
        return None if parts == ["caption 11"] else Image.new("RGB", (8, 8))

    settings = fid.FidGenerationSettings(max_captions=3, seed=40, num_inference_steps=2)
    counts = fid.generate_for_captions(captions, generate, settings, tmp_path / "images", progress=False)
    assert seen == [(["caption 5"], 40, 1e5), (["caption 9"], 41, 1e5), (["caption 11"], 42, 1e5)]
    assert counts == {"captions": 3, "generated": 2, "reused": 0, "no_image": 1}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["5.png", "9.png"]
    with pytest.raises(InputError, match="not empty: give --resume"):
        fid.generate_for_captions(captions, generate, settings, tmp_path / "images", progress=False)
    counts = fid.generate_for_captions(captions, generate, settings, tmp_path / "images", resume=True,
                                       progress=False)
    assert counts == {"captions": 3, "generated": 0, "reused": 2, "no_image": 1}


@pytest.fixture
def mean_colour_inception(monkeypatch, tmp_path):
    """The CLI's Inception replaced by MeanColour (the file must still exist: the CLI checks paths first)."""
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"stand-in")
    monkeypatch.setattr(fid.InceptionFeatures, "from_file", classmethod(lambda cls, path, mode, device: MeanColour()))
    return weights


def test_cli_scores_a_folder_and_reuses_the_reference_statistics(tmp_path, folders, mean_colour_inception):
    real, real_colours, fake, fake_colours = folders
    command = ["eval", "fid", "--generated", str(fake), "--reference", str(real), "--inception",
               str(mean_colour_inception), "--stats-cache", str(tmp_path / "stats"), "--workers", "0", "--quiet"]
    first = CliRunner().invoke(app, command + ["--out", str(tmp_path / "one")])
    assert first.exit_code == 0, first.output
    data = json.loads((tmp_path / "one" / "result.json").read_text())
    assert data["results"]["fid"] == pytest.approx(independent_fid(fake_colours, real_colours), rel=1e-4)
    assert data["settings"]["mode"] == "clean" and data["versions"]["clean-fid"]
    assert data["results"]["reference"]["cached"] is False and "not comparable" in data["notes"][0]
    second = CliRunner().invoke(app, command + ["--out", str(tmp_path / "two")])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "two" / "result.json").read_text())
    assert again["results"]["reference"]["cached"] is True and again["results"]["fid"] == data["results"]["fid"]
    markdown = (tmp_path / "two" / "result.md").read_text()
    assert "mode clean" in markdown and "read from the cache" in markdown and "12.2" in markdown


def test_cli_generates_from_captions_on_the_tiny_checkpoint(tmp_path, folders, mean_colour_inception, tiny_dir):
    real = folders[0]
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"images": [], "annotations": [
        {"id": 10 + i, "image_id": i, "caption": f"a {colour} circle on white"}
        for i, colour in enumerate(("red", "green", "blue", "yellow", "purple", "orange", "black"))]}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "eval", "fid", "--captions", str(captions), "--checkpoint", str(tiny_dir), "--reference", str(real),
        "--inception", str(mean_colour_inception), "--stats-cache", str(tmp_path / "stats"), "--max-captions", "5",
        "--steps", "2", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "result.json").read_text())
    assert data["generation"] == {"captions": 5, "generated": 5, "reused": 0, "no_image": 0}
    assert len(list((out / "images").glob("*.png"))) == 5 and data["results"]["generated_images"] == 5
    assert np.isfinite(data["results"]["fid"]) and data["settings"]["max_captions"] == 5
    assert data["settings"]["options"]["gen_scale_factor"] == 1e5 and data["checkpoint"]["sha256sums_sha256"]


def test_cli_says_what_to_download_and_what_to_give(tmp_path, folders):
    real, _, fake, _ = folders
    result = CliRunner().invoke(app, ["eval", "fid", "--generated", str(fake), "--reference", str(real),
                                      "--inception", str(tmp_path / "nothing.pt"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "inception-2015-12-05.pt" in result.output and "https://" in result.output
    result = CliRunner().invoke(app, ["eval", "fid", "--reference", str(real), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "either --captions FILE" in result.output
    result = CliRunner().invoke(app, ["eval", "fid", "--captions", str(fake), "--reference", str(real)])
    assert result.exit_code == 2 and "--captions needs --checkpoint" in result.output
