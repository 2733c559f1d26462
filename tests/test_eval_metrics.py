"""The eval metrics against known values: identical images, and hand-built pairs recomputed independently.

The CLIP scorer and the LPIPS AlexNet trunk are random-weight stand-ins built here (no hub access); LPIPS's linear
layers are the real ones shipped inside the lpips package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.errors import InputError
from gill.evaluation.fixtures import make_random_alexnet, make_tiny_clip
from gill.evaluation.metrics import ClipSimilarity, Lpips, lpips_tensor, recall_at_k
from gill.tiny import shape_image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    return make_random_alexnet(tmp_path_factory.mktemp("alexnet") / "alexnet-random.pth", seed=5)


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipSimilarity:
    return ClipSimilarity.from_directory(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def lpips_metric(alexnet_file) -> Lpips:
    return Lpips.from_alexnet(alexnet_file, device="cpu")


def _noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


PAIR = (shape_image("red", "circle", "blue", 256), _noise(256, 1))


def test_identical_images_give_similarity_one_and_lpips_zero(clip, lpips_metric):
    images = [shape_image("green", "triangle", "white", 80), _noise(97, 2)]
    assert np.allclose(clip(images, images), 1.0, atol=1e-6)
    assert np.array_equal(lpips_metric(images, images), [0.0, 0.0])


def test_clip_similarity_equals_the_reference_computation(clip, clip_dir):
    """The reference: CLIPModel.get_image_features of each image, normalised, dotted; here the cosine in numpy."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        output = model.get_image_features(**processor(images=list(PAIR), return_tensors="pt"))
    features = (output if torch.is_tensor(output) else output.pooler_output).numpy().astype(np.float64)
    expected = features[0] @ features[1] / (np.linalg.norm(features[0]) * np.linalg.norm(features[1]))
    assert abs(expected) < 0.999  # a real pair, not a degenerate one
    assert clip([PAIR[0]], [PAIR[1]])[0] == pytest.approx(expected, abs=1e-5)


def test_lpips_equals_the_formula_computed_in_numpy(lpips_metric, alexnet_file):
    """LPIPS v0.1 by its definition: scale the [-1, 1] inputs, AlexNet relu1..relu5 activations, unit-normalise each
    position over channels, squared differences weighted by the linear layers, spatial mean, summed over layers."""
    import lpips
    from torchvision.models import alexnet

    trunk = alexnet(weights=None)
    trunk.load_state_dict(torch.load(alexnet_file, weights_only=True))
    linear = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                        weights_only=True)
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def activations(image):  # 256x256 already, so the reference's resize leaves it alone
        pixels = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)[None] / 127.5 - 1
        x = torch.from_numpy((pixels - shift) / scale).float()
        found = []
        with torch.no_grad():
            for index, layer in enumerate(trunk.features):
                x = layer(x)
                if index in (1, 4, 7, 9, 11):  # the ReLUs after conv1..conv5
                    found.append(x.numpy().astype(np.float64))
        return found

    total = 0.0
    for layer, (left, right) in enumerate(zip(activations(PAIR[0]), activations(PAIR[1]))):
        left = left / (np.sqrt((left ** 2).sum(axis=1, keepdims=True)) + 1e-10)
        right = right / (np.sqrt((right ** 2).sum(axis=1, keepdims=True)) + 1e-10)
        weights = linear[f"lin{layer}.model.1.weight"].numpy().astype(np.float64).reshape(1, -1, 1, 1)
        total += float((weights * (left - right) ** 2).sum(axis=1).mean())
    assert total > 0.01
    assert lpips_metric([PAIR[0]], [PAIR[1]])[0] == pytest.approx(total, rel=1e-4)


def test_lpips_input_is_the_references(lpips_metric):
    image = _noise(64, 4)
    tensor = lpips_tensor(image)
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == torch.float32
    assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    exact = lpips_tensor(_noise(256, 4))  # already 256x256: pixels / 127.5 - 1 exactly
    expected = np.asarray(_noise(256, 4), dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1
    assert np.allclose(exact[0].numpy(), expected, atol=1e-6)
    described = lpips_metric.describe()
    assert described["alexnet_is_torchvision_imagenet"] is False  # the random trunk is flagged


def test_recall_at_k_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.2],    # target 0: rank 0
                       [0.9, 0.1, 0.5, 0.2],    # target 1: rank 3
                       [0.3, -np.inf, 0.2, 0.8],  # target 2: rank 2 (one candidate excluded)
                       [0.1, 0.2, 0.3, 0.4]])   # target 3: rank 0
    recall = recall_at_k(scores, [0, 1, 2, 3], ks=(1, 2, 3, 4))
    assert recall == {1: 0.5, 2: 0.5, 3: 0.75, 4: 1.0}
    with pytest.raises(InputError, match="excluded"):
        recall_at_k(scores, [1, 1, 1, 1])
    with pytest.raises(InputError, match="candidate indices"):
        recall_at_k(scores, [0, 1, 2, 4])


def test_loud_errors_for_wrong_model_files(tmp_path, tiny_dir):
    with pytest.raises(InputError, match="visual_projection"):
        ClipSimilarity.from_directory(tiny_dir / "clip")  # a CLIPVisionModel: no projection
    with pytest.raises(InputError, match="config.json"):
        ClipSimilarity.from_directory(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        Lpips.from_alexnet(tmp_path / "absent.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="expected AlexNet's features"):
        Lpips.from_alexnet(tmp_path / "partial.pth")
