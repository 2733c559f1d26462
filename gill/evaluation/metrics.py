"""The paper's image metrics, computed as the reference's scripts compute them, from local weights only.

- :class:`ClipSimilarity`: CLIP image-image cosine similarity (``evals/compute_clip_similarity_vist.py``):
  HF ``CLIPModel.get_image_features`` of both images, L2-normalised, dotted. ``get_image_features`` is the
  vision tower's pooled output through ``visual_projection`` (768-d for ViT-L/14), which is exactly
  ``CLIPVisionModelWithProjection(...).image_embeds``; we load that class from a local copy of
  ``openai/clip-vit-large-patch14`` (the full ``CLIPModel`` directory loads as it is).
- :class:`Lpips`: LPIPS v0.1 with the AlexNet trunk (``evals/lpips_2dirs.py``): pixels to [-1, 1], both images
  resized to 256x256 (bilinear, antialiased), lower is more similar. The ``lpips`` package ships its linear
  layers (``lpips/weights/v0.1/alex.pth``) but takes the AlexNet trunk from torchvision's ImageNet download,
  which needs the network; here the trunk comes from a local file (torchvision's ``alexnet-owt-7be5be79.pth``).
- :func:`recall_at_k`: the share of queries whose target ranks in the top k (FROMAGe's
  ``evals/eval_vist_retrieval.py``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gill.errors import InputError
from gill.evaluation.report import package_version

LPIPS_SIZE = 256  # the reference resizes both images to 256x256 before LPIPS
# torchvision names its weight files <arch>-<first 8 hex digits of their sha256>.pth and checks that prefix.
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
TORCHVISION_ALEXNET_URL = "https://download.pytorch.org/models/" + TORCHVISION_ALEXNET_FILE
TORCHVISION_ALEXNET_SHA256_PREFIX = "7be5be79"
# AlexNet `features` layer index -> the LPIPS trunk slice that holds it (lpips/pretrained_networks.py).
_ALEXNET_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rgb_images(images: Sequence[Image.Image], what: str) -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise InputError(f"{what}: expected a list of PIL images, got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"{what}[{index}]: expected a PIL image, got {type(image).__name__}")
    return [image.convert("RGB") for image in images]


def _check_pairs(generated: Sequence[Image.Image], targets: Sequence[Image.Image]) -> None:
    if len(generated) != len(targets):
        raise InputError(f"{len(generated)} generated images but {len(targets)} targets: give one target per image")


def reference_image_processor(directory: Path):
    """The CLIP image preprocessing of ``directory`` in transformers' PIL backend (``CLIPImageProcessorPil``: PIL
    bicubic resize and centre crop, what transformers 4's ``CLIPImageProcessor``, and so the reference, did);
    transformers 5's default ``CLIPImageProcessor`` resizes with torchvision and gives slightly different pixels
    (``gill eval clip-parity`` measures by how much). Falls back to ``CLIPImageProcessor`` where the PIL class
    does not exist."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(directory)


class ClipSimilarity:
    """CLIP image-image cosine similarity; one value in [-1, 1] per (generated, target) pair, higher is closer."""

    def __init__(self, model, processor, directory: Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.directory = directory
        self.device = torch.device(device)

    @classmethod
    def from_directory(cls, directory: str | Path, device: str | torch.device | None = None) -> ClipSimilarity:
        """Load ``CLIPVisionModelWithProjection`` and its image processor from a local directory (a copy of
        ``openai/clip-vit-large-patch14``, which holds the full ``CLIPModel``). Loads in fp32: the reference
        scores in fp32."""
        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise InputError(f"--clip {directory}: no config.json there; give a local copy of "
                             "openai/clip-vit-large-patch14 (config.json, model.safetensors, preprocessor_config.json)")
        if not (directory / "preprocessor_config.json").is_file():
            raise InputError(f"--clip {directory}: no preprocessor_config.json (the CLIP image preprocessing); "
                             "copy it from openai/clip-vit-large-patch14")
        config = AutoConfig.from_pretrained(directory)
        if isinstance(config, CLIPConfig):
            # A full CLIPModel directory: the vision tower's config, with the model's projection width (the nested
            # vision_config may leave projection_dim at its default, and the projection would not load).
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        from transformers.utils import logging as transformers_logging

        # The text tower's weights are not needed; transformers would print each as "unexpected".
        previous = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(directory, config=config,
                                                                        output_loading_info=True)
        finally:
            transformers_logging.set_verbosity(previous)
        missing = [key for key in info.get("missing_keys", []) if "visual_projection" in key]
        if missing:
            raise InputError(f"--clip {directory}: the checkpoint has no {missing[0]} (a CLIPVisionModel without "
                             "the projection?); the reference's similarity needs the full CLIPModel "
                             "openai/clip-vit-large-patch14")
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, reference_image_processor(directory), directory, device)

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image], batch_size: int = 16) -> np.ndarray:
        """``N`` RGB images -> ``[N, projection_dim]`` float32 unit vectors (``get_image_features``, normalised)."""
        images = _rgb_images(images, "images")
        rows = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=images[start:start + batch_size], return_tensors="pt").pixel_values
            embeds = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).image_embeds.float()
            rows.append(torch.nn.functional.normalize(embeds, dim=-1).cpu().numpy())
        if not rows:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        return np.concatenate(rows)

    def __call__(self, generated: Sequence[Image.Image], targets: Sequence[Image.Image]) -> np.ndarray:
        """``[N]`` float64 cosines of each generated image to its target."""
        _check_pairs(generated, targets)
        return np.sum(self.features(generated).astype(np.float64) * self.features(targets), axis=-1)

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        weights = _weights_file(self.directory) if self.directory is not None else None
        return {
            "implementation": "transformers CLIPVisionModelWithProjection.image_embeds "
                              "(= CLIPModel.get_image_features), cosine of L2-normalised vectors",
            "directory": str(self.directory) if self.directory is not None else None,
            "name_or_path": getattr(config, "_name_or_path", None),
            "image_size": config.image_size, "patch_size": config.patch_size, "hidden_size": config.hidden_size,
            "projection_dim": config.projection_dim, "hidden_act": config.hidden_act,
            "preprocessing": type(self.processor).__name__,
            "weights_file": weights.name if weights else None,
            "weights_sha256": sha256_file(weights) if weights else None,
        }


def _weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def lpips_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> ``[1, 3, 256, 256]`` float32 in [-1, 1], as the reference feeds LPIPS
    (``lpips.im2tensor``, then ``torchvision...resize((256, 256), antialias=True)``, bilinear)."""
    from torchvision.transforms.functional import resize

    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    tensor = torch.from_numpy(array / (255.0 / 2.0) - 1.0).float().permute(2, 0, 1)[None]
    return resize(tensor, [LPIPS_SIZE, LPIPS_SIZE], antialias=True)


def load_alexnet_features(path: str | Path) -> dict[str, torch.Tensor]:
    """The AlexNet ``features`` tensors from a torchvision state dict (``features.0.weight`` ...; the classifier
    is ignored) or a features-only one (``0.weight`` ...), read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--lpips-alexnet {path}: no such file; get torchvision's ImageNet AlexNet "
                         f"({TORCHVISION_ALEXNET_URL}) onto this machine and give its path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or one that is not a plain state dict
        raise InputError(f"--lpips-alexnet {path}: not a readable AlexNet state dict ({error})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    features = {}
    for key, value in state.items():
        name = key.removeprefix("features.") if key.startswith("features.") else key
        parts = name.split(".")
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("weight", "bias"):
            features[name] = value
    expected = {f"{index}.{kind}" for index in (0, 3, 6, 8, 10) for kind in ("weight", "bias")}
    if set(features) != expected:
        raise InputError(f"--lpips-alexnet {path}: expected AlexNet's features {sorted(expected)}, found "
                         f"{sorted(features) or 'none'}; give torchvision's {TORCHVISION_ALEXNET_FILE}")
    return features


class Lpips:
    """LPIPS v0.1 (AlexNet trunk) at 256x256; one distance >= 0 per pair, 0 for identical images, lower is closer."""

    def __init__(self, module: torch.nn.Module, alexnet_path: Path | None, device: str | torch.device = "cpu") -> None:
        self.module = module.eval().to(device)
        self.alexnet_path = alexnet_path
        self.alexnet_sha256 = sha256_file(alexnet_path) if alexnet_path is not None else None
        self.device = torch.device(device)

    @classmethod
    def from_alexnet(cls, path: str | Path, device: str | torch.device | None = None) -> Lpips:
        """LPIPS with the package's v0.1 linear layers and the AlexNet trunk read from ``path`` (see
        :func:`load_alexnet_features`). A file other than torchvision's ImageNet AlexNet (a random one in tests)
        gives a working metric whose values are not comparable to the paper; :meth:`describe` says which."""
        features = load_alexnet_features(path)
        module = _build_lpips()
        trunk = {f"net.slice{_ALEXNET_SLICES[int(key.split('.')[0])]}.{key}": value for key, value in features.items()}
        target = module.state_dict()
        for key, value in trunk.items():
            if target[key].shape != value.shape:
                raise InputError(f"--lpips-alexnet {path}: features.{key.split('.', 2)[2]} has shape "
                                 f"{tuple(value.shape)}, AlexNet's is {tuple(target[key].shape)}")
        module.load_state_dict(trunk, strict=False)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        return cls(module, Path(path), device)

    @torch.inference_mode()
    def __call__(self, generated: Sequence[Image.Image], targets: Sequence[Image.Image]) -> np.ndarray:
        """``[N]`` float64 LPIPS distances of each generated image to its target."""
        _check_pairs(generated, targets)
        generated, targets = _rgb_images(generated, "generated"), _rgb_images(targets, "targets")
        values = []
        for left, right in zip(generated, targets):
            distance = self.module(lpips_tensor(left).to(self.device), lpips_tensor(right).to(self.device))
            values.append(float(distance.flatten()[0]))
        return np.asarray(values, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        import lpips

        linear = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
        imagenet = bool(self.alexnet_sha256 and self.alexnet_sha256.startswith(TORCHVISION_ALEXNET_SHA256_PREFIX))
        return {
            "implementation": f"lpips {package_version('lpips')} LPIPS(net='alex', version='0.1'), inputs in [-1, 1] "
                              f"resized to {LPIPS_SIZE}x{LPIPS_SIZE} (bilinear, antialias)",
            "linear_layers_sha256": sha256_file(linear) if linear.is_file() else None,
            "alexnet_file": str(self.alexnet_path) if self.alexnet_path else None,
            "alexnet_sha256": self.alexnet_sha256,
            # torchvision's ImageNet AlexNet, the trunk the paper's LPIPS used; otherwise not comparable.
            "alexnet_is_torchvision_imagenet": imagenet,
        }


def _build_lpips() -> torch.nn.Module:
    """The lpips module with a random trunk (``pnet_rand``: nothing downloaded); the caller loads the trunk."""
    import lpips

    # lpips asks torchvision for `pretrained=False`, a deprecated spelling: silence that, and keep the random
    # trunk initialisation from moving the caller's random state.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)


def recall_at_k(scores: np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5, 10)
                ) -> dict[int, float]:
    """Recall@k of a retrieval: ``scores`` ``[N, C]`` (query x candidate, higher is better; ``-inf`` excludes a
    candidate) and ``targets`` ``[N]`` the right candidate of each query -> ``{k: share of queries whose target
    is among the k best}``, in [0, 1]. A target's rank counts the candidates scored strictly higher (ties go to the
    target; real-valued scores practically never tie)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise InputError(f"scores must be [N, C] and targets [N]; got {scores.shape} and {targets.shape}")
    if scores.shape[0] == 0:
        raise InputError("no queries: recall@k of an empty set is undefined")
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise InputError(f"targets must be candidate indices in [0, {scores.shape[1]})")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise InputError(f"ks must be integers >= 1, got {list(ks)}")
    target_scores = scores[np.arange(len(targets)), targets]
    if not np.all(np.isfinite(target_scores)):
        raise InputError("a query's target is excluded (score -inf or NaN); exclude only other candidates")
    ranks = np.sum(scores > target_scores[:, None], axis=1)  # 0 = best
    return {k: float(np.mean(ranks < k)) for k in ks}
