"""FID with clean-fid (Parmar et al. 2022): generated images against cached statistics of a folder of real ones.

clean-fid's own feature path does the work: its ``ResizeDataset`` (``clean`` mode: PIL bicubic resize to 299x299
in float, no quantisation; ``legacy_tensorflow``: resized inside the network) and its ``InceptionV3W`` wrapper of
the ``inception-2015-12-05.pt`` TorchScript Inception (the TF-FID weights), via ``get_files_features``; the
distance is its ``frechet_distance``. Two of its conveniences are not used, on purpose:

- the weights: clean-fid downloads them into ``/tmp`` on first use, and these machines have no internet. Here
  they are read from a local file (:meth:`InceptionFeatures.from_file`), whose sha256 the result records.
- ``make_custom_stats``: it builds the downloading extractor itself and writes into the installed package's
  folder (read-only in a container, lost on reinstall). :func:`reference_statistics` stores the same ``mu`` /
  ``sigma`` npz under a cache directory instead, keyed by the reference folder's listing (names, sizes, mtimes),
  the mode and the feature extractor, so the real images are read once and a changed folder is not mistaken
  for the cached one.

Anything with ``__call__([B, 3, 299, 299] float32 in [0, 255]) -> [B, D]`` and ``describe() -> dict`` (with an
``id``) can stand in for the Inception (tests use a tiny one).

MS-COCO zero-shot FID (the paper's 12.2): one image per caption for 30,000 captions of ``captions_val2014.json``
(:func:`read_coco_captions`, :func:`sample_captions`), against COCO val2014 images.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gill.errors import InputError
from gill.evaluation.datasets import read_json
from gill.evaluation.report import package_version

MODES = ("clean", "legacy_tensorflow")  # both use the TF-FID Inception; legacy_pytorch needs other weights
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
COCO_30K = 30_000  # the usual zero-shot setting: 30K captions of COCO val2014


class FeatureExtractor(Protocol):
    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


class InceptionFeatures:
    """clean-fid's Inception feature extractor (``InceptionV3W``: 2048-d pool features) from a local file."""

    def __init__(self, module: torch.nn.Module, path: Path, mode: str, device: str | torch.device) -> None:
        self.module, self.path, self.mode, self.device = module.eval().to(device), path, mode, torch.device(device)
        self.sha256 = _sha256(path)

    @classmethod
    def from_file(cls, path: Path, mode: str = "clean", device: str | torch.device | None = None
                  ) -> InceptionFeatures:
        """Load clean-fid's ``inception-2015-12-05.pt`` TorchScript from ``path``; raises :class:`InputError`
        saying what to download when it is missing or not that kind of file."""
        from cleanfid.inception_torchscript import InceptionV3W

        check_mode(mode)
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--inception {path}: no such file. FID needs clean-fid's Inception weights, which "
                             f"clean-fid would download from the internet (not done here): fetch {INCEPTION_URL} "
                             f"(a TorchScript file of about 92 MB) onto this machine and give its path")
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
            layers = scripted.layers
        except Exception as error:  # not a TorchScript archive, or one without the Inception's `layers`
            raise InputError(f"--inception {path}: not clean-fid's TorchScript Inception ({INCEPTION_FILE} from "
                             f"{INCEPTION_URL}): {error}") from None

        class LocalInception(InceptionV3W):  # clean-fid's wrapper (its normalisation and forward), weights given
            def __init__(self) -> None:
                torch.nn.Module.__init__(self)
                self.base, self.layers, self.resize_inside = scripted, layers, mode == "legacy_tensorflow"

        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(LocalInception(), path, mode, device)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 299, 299]`` float32 pixels in [0, 255] -> ``[B, 2048]`` float32 features."""
        return self.module(batch.to(self.device)).float()

    def describe(self) -> dict[str, Any]:
        return {"id": f"inception-torchscript-{self.sha256}",
                "implementation": f"clean-fid {package_version('clean-fid')} InceptionV3W "
                                  "(TF-FID Inception, 2048-d pool3)",
                "file": str(self.path), "sha256": self.sha256}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"mode {mode!r}: choose {' or '.join(MODES)} (legacy_pytorch needs pytorch-fid's weights, "
                         "not supported here)")


def image_files(directory: Path, what: str) -> list[Path]:
    """The images clean-fid would read under ``directory`` (recursive, its extensions), sorted; at least two."""
    from cleanfid.utils import EXTENSIONS

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{what} {directory}: no such directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix[1:] in EXTENSIONS
                   and p.suffix != ".npy")
    if len(files) < 2:
        raise InputError(f"{what} {directory}: {len(files)} images found; FID needs at least 2 (thousands to mean "
                         f"anything; extensions: {', '.join(sorted(e for e in EXTENSIONS if e != 'npy'))})")
    return files


def folder_features(files: Sequence[Path], extractor: FeatureExtractor, mode: str = "clean", batch_size: int = 32,
                    workers: int = 0, progress: bool = True, description: str = "") -> np.ndarray:
    """``[N, D]`` float features of ``files`` through clean-fid's resize (``mode``) and ``extractor``."""
    from cleanfid.fid import get_files_features

    check_mode(mode)
    try:
        return get_files_features([str(f) for f in files], model=extractor, num_workers=workers,
                                  batch_size=batch_size, device=torch.device("cpu"), mode=mode,
                                  description=description, verbose=progress)
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError and names the file
        raise InputError(f"{description.strip(' :')}: an image could not be read ({error})") from None
    except RuntimeError as error:
        if mode == "legacy_tensorflow" and "stack expects each tensor to be equal size" in str(error):
            raise InputError(f"{description.strip(' :')}: mode legacy_tensorflow needs images of one size (clean-fid "
                             "batches them before the network resizes them); use --mode clean") from None
        raise


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (rows are samples), as clean-fid computes them."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """clean-fid's Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``."""
    from cleanfid.fid import frechet_distance as clean_fid_distance

    try:
        return float(clean_fid_distance(mu1, sigma1, mu2, sigma2))
    except (AssertionError, ValueError) as error:
        raise InputError(f"FID could not be computed: {error or 'feature shapes differ'}") from None


def reference_statistics(directory: Path, extractor: FeatureExtractor, mode: str, cache: Path,
                         batch_size: int = 32, workers: int = 0, progress: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``mu``, ``sigma`` of the real images under ``directory`` and what was used (``cached``: read from the
    cache rather than computed). Computed once per (folder listing, mode, extractor) and kept under ``cache``
    as ``<folder>-<mode>-<key>.npz`` (clean-fid's ``mu``/``sigma`` layout) with a JSON note beside it."""
    files = image_files(directory, "--reference")
    listing = [[str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    identity = extractor.describe()["id"]
    key = hashlib.sha256(json.dumps({"files": listing, "mode": mode, "extractor": identity}).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(directory).resolve().name) or "reference"
    path = Path(cache) / f"{name}-{mode}-{key[:16]}.npz"
    info = {"directory": str(Path(directory).resolve()), "images": len(files), "mode": mode, "extractor": identity,
            "key": key, "stats_file": str(path)}
    if path.is_file():
        with np.load(path) as stored:
            return stored["mu"], stored["sigma"], info | {"cached": True}
    features = folder_features(files, extractor, mode, batch_size, workers, progress, f"reference {name} : ")
    mu, sigma = statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial.npz")
    np.savez_compressed(temporary, mu=mu, sigma=sigma)
    temporary.replace(path)  # a run stopped mid-write leaves no half file under the real name
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return mu, sigma, info | {"cached": False}


def fid_against_reference(generated: Path, reference: Path, extractor: FeatureExtractor, mode: str, cache: Path,
                          batch_size: int = 32, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """FID of the images under ``generated`` against the (cached) statistics of those under ``reference``."""
    check_mode(mode)
    mu_ref, sigma_ref, reference_info = reference_statistics(reference, extractor, mode, cache, batch_size, workers,
                                                             progress)
    files = image_files(generated, "generated images in")
    features = folder_features(files, extractor, mode, batch_size, workers, progress, "generated : ")
    mu, sigma = statistics(features)
    return {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "generated_images": len(files),
            "generated_sizes": _sizes(files), "reference": reference_info}


def _sizes(files: Sequence[Path]) -> dict[str, int]:
    """``{"WxH": count}`` of the images (their sizes before clean-fid resizes them to 299x299)."""
    from PIL import Image

    sizes: dict[str, int] = {}
    for file in files:
        try:
            with Image.open(file) as image:
                size = f"{image.width}x{image.height}"
        except OSError:
            size = "unreadable"
        sizes[size] = sizes.get(size, 0) + 1
    return sizes


# ------------------------------------------------------------------------------------------ COCO captions


@dataclass(frozen=True)
class CocoCaption:
    id: int  # the annotation's id: generated images are saved as <id>.png
    image_id: int
    caption: str


def read_coco_captions(path: Path) -> list[CocoCaption]:
    """The ``annotations`` of an MS-COCO captions file (``captions_val2014.json``), in file order; raises
    :class:`InputError` naming the file and the first malformed entry."""
    path = Path(path)
    data = read_json(path, "an MS-COCO captions file, e.g. annotations/captions_val2014.json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected an object with an 'annotations' list (the MS-COCO captions format)")
    captions = []
    for index, entry in enumerate(data["annotations"]):
        if not isinstance(entry, dict) or not all(key in entry for key in ("id", "image_id", "caption")):
            raise InputError(f"{path}: annotations[{index}] must be an object with id, image_id and caption")
        if not isinstance(entry["caption"], str) or not entry["caption"].strip():
            raise InputError(f"{path}: annotations[{index}].caption must be a non-empty string")
        try:
            captions.append(CocoCaption(int(entry["id"]), int(entry["image_id"]), entry["caption"].strip()))
        except (TypeError, ValueError):
            raise InputError(f"{path}: annotations[{index}] id and image_id must be integers") from None
    if not captions:
        raise InputError(f"{path}: no captions")
    return captions


def sample_captions(captions: Sequence[CocoCaption], count: int | None, seed: int) -> list[CocoCaption]:
    """``count`` captions drawn uniformly without replacement with ``random.Random(seed)`` (all of them, in file
    order, when ``count`` is None or not smaller)."""
    if count is not None and count < 1:
        raise InputError(f"max_captions={count}: give at least 1, or None for all")
    if count is None or count >= len(captions):
        return list(captions)
    return random.Random(seed).sample(list(captions), count)


@dataclass(frozen=True)
class FidGenerationSettings:
    """How the images are generated: forced generation as the other evals, one per caption."""

    max_captions: int | None = COCO_30K
    seed: int = 42  # sampling seed; the diffusion seed of the i-th sampled caption is seed + i
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"

    def __post_init__(self) -> None:
        if self.max_captions is not None and self.max_captions < 1:
            raise InputError(f"max_captions={self.max_captions}: give at least 1, or None for all")
        self.options(0)

    def options(self, index: int):
        from gill.evaluation.generation import forced_generation_options

        return forced_generation_options(self.seed + index, self.guidance_scale, self.num_inference_steps,
                                         self.scheduler)


def generate_for_captions(captions: Sequence[CocoCaption], generate, settings: FidGenerationSettings,
                          directory: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """One image per caption, forced, into ``directory/<annotation id>.png``; the i-th caption's noise is seeded
    with ``seed + i`` (FID needs varied samples: one seed for all would correlate them). With ``resume``, images
    already there are kept; without it the directory must be empty. Returns the counts (generated, reused,
    no_image)."""
    from tqdm import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    if not resume and any(directory.iterdir()):
        # Images of another run would be scored with these: refuse rather than mix them.
        raise InputError(f"{directory} is not empty: give --resume to keep its images (those of an interrupted run "
                         "with the same settings) or another --out")
    counts = {"captions": len(captions), "generated": 0, "reused": 0, "no_image": 0}
    for index, caption in enumerate(tqdm(captions, desc="generating", unit="caption", disable=not progress)):
        path = directory / f"{caption.id}.png"
        if resume and path.is_file():
            counts["reused"] += 1
            continue
        image = generate([caption.caption], settings.options(index))
        if image is None:
            counts["no_image"] += 1
            continue
        partial = path.with_name(path.name + ".part")  # not an image name: FID never reads a half-written file
        image.save(partial, format="PNG")
        partial.replace(path)  # an interrupted run leaves no half image that --resume would keep
        counts["generated"] += 1
    return counts


def settings_record(settings: FidGenerationSettings) -> dict[str, Any]:
    return asdict(settings) | {"options": settings.options(0).to_dict() | {"seed": "seed + caption index"}}


def _sha256(path: Path) -> str:
    from gill.evaluation.metrics import sha256_file

    return sha256_file(path)
