"""HF CLIP vs open_clip on converted weights (`gill eval clip-parity`), offline with a tiny random CLIP.

The tiny model's weights are perturbed away from HF's initialisation (zero biases, unit layer norms), so that every
mapped tensor matters and a wrong key mapping shows in the features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gill.cli import app
from gill.evaluation import clip_parity
from gill.evaluation.fixtures import make_tiny_clip
from gill.evaluation.metrics import ClipSimilarity


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor, CLIPModel

    source = make_tiny_clip(tmp_path_factory.mktemp("clip-source"), seed=7)
    model = CLIPModel.from_pretrained(source).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory)
    CLIPImageProcessor.from_pretrained(source).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def scorer(clip_dir) -> ClipSimilarity:
    return ClipSimilarity.from_directory(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def pixels(scorer) -> torch.Tensor:
    images = [image for _, image in clip_parity.fixture_images()]
    return scorer.processor(images=images, return_tensors="pt").pixel_values


def _hf_features(scorer, pixels) -> torch.Tensor:
    with torch.inference_mode():
        return scorer.model(pixel_values=pixels).image_embeds


def _oc_features(visual, pixels) -> torch.Tensor:
    with torch.inference_mode():
        return visual(pixels)


def test_converted_model_gives_hf_features_on_the_same_pixels(scorer, pixels):
    visual, config = clip_parity.convert(scorer.model)
    assert config["quick_gelu"] and config["vision_cfg"]["patch_size"] == 8 and config["embed_dim"] == 16
    hf = _hf_features(scorer, pixels)
    assert hf.abs().max() > 0.1
    torch.testing.assert_close(_oc_features(visual, pixels), hf, atol=1e-5, rtol=1e-5)


def test_every_mapped_tensor_matters(scorer, pixels):
    """Perturbing any one converted tensor moves the features: the check above would catch a wrong mapping."""
    visual, _ = clip_parity.convert(scorer.model)
    pixels = pixels[:2]
    hf = _hf_features(scorer, pixels)
    state = {key: value.clone() for key, value in visual.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    for key, value in state.items():
        # Random, not constant: a constant shift of an embedding is removed by the layer norm after it.
        visual.load_state_dict(state | {key: value + 0.5 * torch.randn(value.shape, generator=generator)})
        assert not torch.allclose(_oc_features(visual, pixels), hf, atol=1e-3), key
    visual.load_state_dict(state)
    torch.testing.assert_close(_oc_features(visual, pixels), hf, atol=1e-5, rtol=1e-5)


def test_wrong_qkv_order_or_untransposed_projection_breaks_parity(scorer, pixels):
    visual, _ = clip_parity.convert(scorer.model)
    hf = _hf_features(scorer, pixels)
    state = clip_parity.hf_to_open_clip_state_dict(scorer.model.state_dict(), layers=2)
    q, k, v = state["transformer.resblocks.0.attn.in_proj_weight"].chunk(3)
    visual.load_state_dict(state | {"transformer.resblocks.0.attn.in_proj_weight": torch.cat([k, q, v])})
    assert not torch.allclose(_oc_features(visual, pixels), hf, atol=1e-3)
    visual.load_state_dict(state | {"proj": state["proj"].t().contiguous()})
    assert not torch.allclose(_oc_features(visual, pixels), hf, atol=1e-3)


def test_vit_l14_config_is_open_clips_quickgelu_one():
    from transformers import CLIPVisionConfig

    config = clip_parity.open_clip_vision_config(
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=224, patch_size=14, hidden_act="quick_gelu"), projection_dim=768)
    assert "ViT-L-14-quickgelu" in clip_parity.registered_configs(config)


def test_similarities_with_each_sides_preprocessing(scorer):
    visual, _ = clip_parity.convert(scorer.model)
    result = clip_parity.compare(scorer.model, scorer.processor, visual, clip_parity.fixture_images())
    assert len(result["pairs"]) == 5 and len(result["images"]) == 6
    for pair in result["pairs"]:
        assert all(math.isfinite(pair[key]) for key in ("hf", "open_clip", "abs_diff", "open_clip_same_pixels"))
        assert pair["abs_diff"] == pytest.approx(abs(pair["hf"] - pair["open_clip"]))
        assert pair["same_pixels_abs_diff"] < 1e-6
    assert result["summary"]["same_pixels_max_abs_unit_feature_diff"] < 1e-5
    assert result["verdict"]["architecture"] == "agree"
    assert math.isfinite(result["summary"]["own_preprocessing_max_abs_similarity_diff"])
    # transformers' PIL backend resizes exactly as open_clip (PIL bicubic, same crop); the default torchvision
    # backend is within one grey level (1 / 255 / std = 0.015 after normalisation).
    assert result["summary"]["hf_pil_vs_open_clip_max_abs_pixel_diff"] < 1e-6
    assert result["summary"]["max_abs_pixel_diff"] < 0.016
    assert all(math.isfinite(pair["hf_pil"]) for pair in result["pairs"])

    # A square image at the model's resolution (32): neither side resizes or crops; only rounding differs.
    rng = np.random.default_rng(0)
    square = [(f"square-{i}", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for i in range(3)]
    result = clip_parity.compare(scorer.model, scorer.processor, visual, square)
    assert result["summary"]["max_abs_pixel_diff"] < 1e-3
    assert result["summary"]["own_preprocessing_max_abs_similarity_diff"] < 1e-4
    assert result["verdict"]["overall"] == "agree"


def test_cli_writes_the_result(clip_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, image in clip_parity.fixture_images()[:3]:
        image.save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"not a png")
    run = CliRunner().invoke(app, ["eval", "clip-parity", "--clip", str(clip_dir), "--images", str(images),
                                   "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [pair["a"] for pair in result["pairs"]] == ["landscape-320x240.png", "portrait-240x320.png"]
    assert result["verdict"]["architecture"] == "agree" and result["versions"]["open_clip_torch"]
    assert "broken.png" in result["notes"][0]
    assert "Verdict" in (tmp_path / "out" / "result.md").read_text()

    run = CliRunner().invoke(app, ["eval", "clip-parity", "--clip", str(clip_dir), "--out", str(tmp_path / "fx")])
    assert run.exit_code == 0, run.output
    assert len(json.loads((tmp_path / "fx" / "result.json").read_text())["pairs"]) == 5

    run = CliRunner().invoke(app, ["eval", "clip-parity", "--clip", str(tmp_path / "nowhere")])
    assert run.exit_code != 0 and "config.json" in run.output
