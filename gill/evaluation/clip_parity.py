"""HF transformers CLIP vs open_clip on the same weights: does the choice of implementation move the CLIP score?

The evals score CLIP image-image similarity with HF ``CLIPVisionModelWithProjection`` (:class:`ClipSimilarity`);
the open_clip equivalent is ``ViT-L-14-quickgelu`` with OpenAI's weights. Offline there are no OpenAI weights in
open_clip's format, so the HF checkpoint is converted: :func:`open_clip_vision_config` builds the open_clip
vision tower's config from the HF config (width, layers, heads, MLP ratio, patch and image size, QuickGELU, layer
norm eps), :func:`hf_to_open_clip_state_dict` maps the HF tensors onto it (q, k, v fused into open_clip's
``in_proj_weight``; the projection transposed), loaded strictly. :func:`compare` then measures

- the architecture alone: both towers fed the SAME pixels (the HF processor's), features compared;
- the whole path: each side with its own preprocessing (HF's image processor as :class:`ClipSimilarity` uses
  it; open_clip's validation transform at the model's image size with OpenAI's mean and std), and the
  image-image similarity of each pair both ways.

``gill eval clip-parity`` runs it on a checkpoint and a folder of images, or on :func:`fixture_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from gill.errors import InputError

# Same pixels, same weights: the L2-normalised features may differ by float rounding only (fp32).
ARCHITECTURE_TOLERANCE = 1e-4
# Own preprocessing each side: a pair's similarity may move by this much; the paper reports three decimals, and
# a shift over 0.002 could change the third one of an average.
SIMILARITY_TOLERANCE = 2e-3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def open_clip_vision_config(hf_vision_config, projection_dim: int) -> dict[str, Any]:
    """open_clip's ``CLIPVisionCfg`` fields (and ``embed_dim``, ``quick_gelu``) for an HF CLIP vision config."""
    width, heads = hf_vision_config.hidden_size, hf_vision_config.num_attention_heads
    act = hf_vision_config.hidden_act
    if act not in ("quick_gelu", "gelu"):
        raise InputError(f"CLIP activation {act!r}: open_clip's ViT builds QuickGELU or exact GELU only")
    if width % heads or hf_vision_config.intermediate_size % width:
        raise InputError(f"CLIP vision width {width}, heads {heads}, MLP {hf_vision_config.intermediate_size}: "
                         "open_clip needs whole head widths and an integer MLP ratio")
    return {
        "embed_dim": int(projection_dim),
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {
            "image_size": int(hf_vision_config.image_size),
            "layers": int(hf_vision_config.num_hidden_layers),
            "width": int(width),
            "head_width": int(width // heads),
            "mlp_ratio": float(hf_vision_config.intermediate_size // width),
            "patch_size": int(hf_vision_config.patch_size),
            "norm_kwargs": {"eps": float(hf_vision_config.layer_norm_eps)},
        },
    }


def registered_configs(config: dict[str, Any]) -> list[str]:
    """open_clip's own model configs whose vision tower is ``config``'s (e.g. ``ViT-L-14-quickgelu`` for
    openai/clip-vit-large-patch14): the conversion builds the architecture open_clip would."""
    import open_clip

    vision = {key: value for key, value in config["vision_cfg"].items() if key != "norm_kwargs"}
    defaults = {"head_width": 64, "mlp_ratio": 4.0}
    names = []
    for name in open_clip.list_models():
        other = open_clip.get_model_config(name) or {}
        cfg = other.get("vision_cfg", {})
        if any(key.startswith("timm") for key in cfg) or other.get("embed_dim") != config["embed_dim"]:
            continue
        if bool(other.get("quick_gelu", False)) != config["quick_gelu"]:
            continue
        if all(cfg.get(key, defaults.get(key)) == value for key, value in vision.items()) and set(cfg) <= set(
                vision) | {"head_width", "mlp_ratio"}:
            names.append(name)
    return names


def hf_to_open_clip_state_dict(hf_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` / ``CLIPVisionModelWithProjection`` tensors (``vision_model.*``,
    ``visual_projection.weight``) -> open_clip ``VisionTransformer`` tensors. Text-tower keys are ignored."""
    prefix = "vision_model."

    def get(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise InputError(f"the CLIP checkpoint has no {key}")
        return hf_state[key]

    out = {
        "class_embedding": get(prefix + "embeddings.class_embedding"),
        "positional_embedding": get(prefix + "embeddings.position_embedding.weight"),
        "conv1.weight": get(prefix + "embeddings.patch_embedding.weight"),
        "ln_pre.weight": get(prefix + "pre_layrnorm.weight"),
        "ln_pre.bias": get(prefix + "pre_layrnorm.bias"),
        "ln_post.weight": get(prefix + "post_layernorm.weight"),
        "ln_post.bias": get(prefix + "post_layernorm.bias"),
        # HF: Linear(width -> dim), y = x W^T; open_clip: y = x @ proj, proj [width, dim].
        "proj": get("visual_projection.weight").t().contiguous(),
    }
    for index in range(layers):
        hf, oc = f"{prefix}encoder.layers.{index}.", f"transformer.resblocks.{index}."
        # nn.MultiheadAttention's in_proj stacks q, k, v along the output dimension, in that order.
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [get(f"{hf}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")], dim=0)
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{oc}{ours}.{kind}"] = get(f"{hf}{theirs}.{kind}")
    return out


def convert(hf_model) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The open_clip vision tower (with its projection) holding ``hf_model``'s weights (loaded strictly), and
    the open_clip config it was built from. ``hf_model``: a ``CLIPVisionModelWithProjection`` or ``CLIPModel``."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision_config = getattr(hf_model.config, "vision_config", hf_model.config)
    projection_dim = getattr(hf_model.config, "projection_dim", None) or vision_config.projection_dim
    config = open_clip_vision_config(vision_config, projection_dim)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's random state
        visual = _build_vision_tower(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]),
                                     quick_gelu=config["quick_gelu"])
    state = hf_to_open_clip_state_dict(hf_model.state_dict(), config["vision_cfg"]["layers"])
    visual.load_state_dict(state, strict=True)
    return visual.eval(), config


def open_clip_transform(image_size: int):
    """open_clip's inference preprocessing: shortest side to ``image_size`` (bicubic), centre crop, OpenAI
    mean/std (what ``open_clip.create_model_and_transforms('ViT-L-14-quickgelu', 'openai')`` returns)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform

    return image_transform(image_size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


def fixture_images() -> list[tuple[str, Image.Image]]:
    """A few synthetic photos-like images (gradients, shapes, texture) of different sizes and aspect ratios: the
    two preprocessings resize and crop non-square images differently. Deterministic."""
    sizes = [("square-224", 224, 224), ("landscape-320x240", 320, 240), ("portrait-240x320", 240, 320),
             ("wide-500x180", 500, 180), ("odd-97x311", 97, 311), ("large-640x480", 640, 480)]
    images = []
    for index, (name, width, height) in enumerate(sizes):
        rng = np.random.default_rng(index)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(80, 200, 3)
        texture = 40 * np.sin(x / rng.uniform(3, 9)) * np.cos(y / rng.uniform(3, 9))
        array = np.clip(base + texture[..., None] + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            x1, y1 = x0 + int(rng.integers(8, max(9, width // 2))), y0 + int(rng.integers(8, max(9, height // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        images.append((name, image))
    return images


def folder_images(directory: str | Path) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """The images of a folder (sorted by name) and the names of unreadable ones (skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"--images {directory}: not a directory")
    images, unreadable = [], []
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                images.append((path.name, image.convert("RGB")))
        except OSError:
            unreadable.append(path.name)
    return images, unreadable


def pil_processor(processor):
    """The same settings in transformers' PIL backend (``CLIPImageProcessorPil``: PIL bicubic, as transformers 4's
    default processor, the reference's), or None where this transformers has no such class. transformers 5's
    default ``CLIPImageProcessor`` resizes torch tensors with torchvision instead."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        return None
    if isinstance(processor, CLIPImageProcessorPil):
        return processor
    settings = {key: value for key, value in processor.to_dict().items()
                if key not in ("image_processor_type", "processor_class")}
    return CLIPImageProcessorPil(**settings)


def _batched(forward, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    return torch.cat([forward(pixels[start:start + batch_size]).float()
                      for start in range(0, len(pixels), batch_size)])


def _unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.double(), dim=-1)


@torch.inference_mode()
def compare(hf_model, processor, visual: torch.nn.Module, images: Sequence[tuple[str, Image.Image]],
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Per image and per consecutive pair (image i with image i+1), HF vs open_clip: see the module docstring."""
    if len(images) < 2:
        raise InputError(f"{len(images)} image(s): give at least two to form a pair")
    device = torch.device(device)
    hf_model, visual = hf_model.eval().to(device), visual.eval().to(device)
    image_size = int(visual.image_size[0])
    transform = open_clip_transform(image_size)
    names = [name for name, _ in images]
    rgb = [image.convert("RGB") for _, image in images]

    hf_pixels = processor(images=rgb, return_tensors="pt").pixel_values.to(device, torch.float32)
    oc_pixels = torch.stack([transform(image) for image in rgb]).to(device)
    def hf_forward(pixels: torch.Tensor) -> torch.Tensor:
        return hf_model(pixel_values=pixels).image_embeds

    hf_own = _batched(hf_forward, hf_pixels)
    oc_same = _batched(visual, hf_pixels)  # the SAME pixels: the architecture alone
    oc_own = _batched(visual, oc_pixels)
    pil = pil_processor(processor)
    pil_pixels = pil(images=rgb, return_tensors="pt").pixel_values.to(device, torch.float32) if pil else None
    pil_unit = _unit(_batched(hf_forward, pil_pixels)) if pil else None

    raw_diff = (hf_own - oc_same).abs().amax(dim=-1)
    unit_diff = (_unit(hf_own) - _unit(oc_same)).abs().amax(dim=-1)
    hf_unit, oc_unit = _unit(hf_own), _unit(oc_own)
    per_image = []
    for index, name in enumerate(names):
        per_image.append({
            "name": name, "size": list(rgb[index].size),
            "same_pixels_max_abs_feature_diff": float(raw_diff[index]),
            "same_pixels_max_abs_feature_diff_relative": float(raw_diff[index] / hf_own[index].abs().max()),
            "same_pixels_max_abs_unit_feature_diff": float(unit_diff[index]),
            "preprocessing_max_abs_pixel_diff": float((hf_pixels[index] - oc_pixels[index]).abs().max()),
            "own_preprocessing_cosine_hf_vs_open_clip": float((hf_unit[index] * oc_unit[index]).sum()),
            "hf_pil_vs_open_clip_max_abs_pixel_diff":
                float((pil_pixels[index] - oc_pixels[index]).abs().max()) if pil else None,
        })
    pairs = []
    for index in range(len(names) - 1):
        hf_sim = float((hf_unit[index] * hf_unit[index + 1]).sum())
        oc_sim = float((oc_unit[index] * oc_unit[index + 1]).sum())
        same_sim = float((_unit(oc_same)[index] * _unit(oc_same)[index + 1]).sum())
        pairs.append({"a": names[index], "b": names[index + 1], "hf": hf_sim, "open_clip": oc_sim,
                      "abs_diff": abs(hf_sim - oc_sim), "open_clip_same_pixels": same_sim,
                      "same_pixels_abs_diff": abs(hf_sim - same_sim),
                      "hf_pil": float((pil_unit[index] * pil_unit[index + 1]).sum()) if pil else None})
    arch = max(item["same_pixels_max_abs_unit_feature_diff"] for item in per_image)
    sim = max(item["abs_diff"] for item in pairs)
    summary = {
        "same_pixels_max_abs_feature_diff": max(item["same_pixels_max_abs_feature_diff"] for item in per_image),
        "same_pixels_max_abs_unit_feature_diff": arch,
        "same_pixels_max_abs_similarity_diff": max(item["same_pixels_abs_diff"] for item in pairs),
        "own_preprocessing_max_abs_similarity_diff": sim,
        "own_preprocessing_mean_similarity_hf": float(np.mean([item["hf"] for item in pairs])),
        "own_preprocessing_mean_similarity_open_clip": float(np.mean([item["open_clip"] for item in pairs])),
        "max_abs_pixel_diff": max(item["preprocessing_max_abs_pixel_diff"] for item in per_image),
        "hf_pil_vs_open_clip_max_abs_pixel_diff":
            max(item["hf_pil_vs_open_clip_max_abs_pixel_diff"] for item in per_image) if pil else None,
        "hf_pil_vs_open_clip_max_abs_similarity_diff":
            max(abs(item["hf_pil"] - item["open_clip"]) for item in pairs) if pil else None,
    }
    verdict = {
        "architecture": "agree" if arch <= ARCHITECTURE_TOLERANCE else "differ",
        "architecture_tolerance": ARCHITECTURE_TOLERANCE,
        "with_preprocessing": "agree" if sim <= SIMILARITY_TOLERANCE else "differ",
        "similarity_tolerance": SIMILARITY_TOLERANCE,
    }
    verdict["overall"] = "agree" if verdict["architecture"] == verdict["with_preprocessing"] == "agree" else "differ"
    return {"images": per_image, "pairs": pairs, "summary": summary, "verdict": verdict,
            "preprocessing": {"hf": f"{type(processor).__module__}.{type(processor).__name__}",
                              "hf_pil": f"{type(pil).__module__}.{type(pil).__name__}" if pil else None,
                              "open_clip": " ".join(repr(transform).split())}}


def markdown(result: dict[str, Any]) -> str:
    """``result.md`` of ``gill eval clip-parity``."""
    verdict, summary = result["verdict"], result["summary"]
    lines = [f"# CLIP parity: HF transformers vs open_clip ({result['clip']['directory']})", "",
             f"open_clip config built from the HF config: {result['open_clip_config']}; open_clip's own configs "
             f"with this vision tower: {', '.join(result['open_clip_registered']) or 'none'}.", "",
             f"HF preprocessing: `{result['preprocessing']['hf']}`; "
             f"open_clip: `{result['preprocessing']['open_clip']}`.",
             "", f"**Verdict: {verdict['overall']}** (architecture, same pixels: {verdict['architecture']}, max |Δ| "
             f"of unit features {summary['same_pixels_max_abs_unit_feature_diff']:.2e}, tolerance "
             f"{verdict['architecture_tolerance']:g}; each side's own preprocessing: "
             f"{verdict['with_preprocessing']}, max |Δ similarity| "
             f"{summary['own_preprocessing_max_abs_similarity_diff']:.5f}, "
             f"tolerance {verdict['similarity_tolerance']:g})",
             "", "| pair | HF | open_clip | abs diff | open_clip, HF's pixels | HF, PIL backend |",
             "|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        pil = "n/a" if pair.get("hf_pil") is None else f"{pair['hf_pil']:.5f}"
        lines.append(f"| {pair['a']} / {pair['b']} | {pair['hf']:.5f} | {pair['open_clip']:.5f} | "
                     f"{pair['abs_diff']:.5f} | {pair['open_clip_same_pixels']:.5f} | {pil} |")
    lines += ["", "| image | size | same pixels: max abs feature diff (raw / relative) | max abs pixel diff of the "
                  "preprocessings | cosine HF vs open_clip, own preprocessing |", "|---|---|---|---|---|"]
    for item in result["images"]:
        lines.append(f"| {item['name']} | {item['size'][0]}x{item['size'][1]} | "
                     f"{item['same_pixels_max_abs_feature_diff']:.2e} / "
                     f"{item['same_pixels_max_abs_feature_diff_relative']:.2e} | "
                     f"{item['preprocessing_max_abs_pixel_diff']:.4f} | "
                     f"{item['own_preprocessing_cosine_hf_vs_open_clip']:.6f} |")
    if summary.get("hf_pil_vs_open_clip_max_abs_pixel_diff") is not None:
        lines += ["", f"HF with its PIL backend (`{result['preprocessing']['hf_pil']}`, the resizing of transformers "
                      f"4's default processor): max |Δ| of its pixels vs open_clip's "
                      f"{summary['hf_pil_vs_open_clip_max_abs_pixel_diff']:.4f}, of the pair similarities "
                      f"{summary['hf_pil_vs_open_clip_max_abs_similarity_diff']:.5f}."]
    notes = result.get("notes") or []
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines.append("")
    return "\n".join(lines)
