"""The pocket model's CLIP: a small ViT and text transformer trained contrastively from scratch on the shapes world.

It plays two parts, as CLIP does in GILL: the vision tower is GILL's image encoder (ViT-L/14 in the paper), and the
text tower is Stable Diffusion's text encoder (SD v1.5 conditions on CLIP ViT-L's text tower). Text is tokenized by
character (:func:`gill.tiny.build_char_clip_tokenizer`): the world's captions are short, and 77 positions hold them.

Captions describe scenes partly ("a red circle" fits a red circle on any background), so a batch may hold several
true pairs per row; the loss's targets spread evenly over every caption that describes an image, instead of
treating those as negatives.

Usage::

    clip = train_clip(World(seed=0), CLIPTrainConfig(), seed=0)
    save_clip(clip, vision_dir=Path("pocket/clip"), text_dir=Path("pocket/sd"))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gill.pocket.world import Scene, World

CLIP_MAX_LENGTH = 77  # SD's text encoder is always given 77 positions


@dataclass(frozen=True)
class CLIPTrainConfig:
    """Sizes and budget of the pocket CLIP (about 6 minutes on 2 cores; top-1 among the 168 captions 1.0 on new
    images of training scenes, 0.75 on held-out ones). ``text_width`` is SD's cross-attention width and the
    mapper's output width."""

    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64
    # 3,000 images and 700 steps: a linear probe on the vision tower's pooled output told the shape of new images
    # for 88% (and the retrieval space inherited it: squares retrieved as circles); 10,000 and 2,500: 99%. Batches
    # of twins (World.twins: a scene, its other shapes, its colours swapped) instead of random images moved it to
    # 89% only, at 700 steps over 3,000 images.
    images: int = 10000
    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100

    def quick(self) -> CLIPTrainConfig:
        return replace(self, images=64, steps=5, batch_size=16)


def char_tokenizer(directory: Path):
    """The character-level ``CLIPTokenizer`` (built into ``directory`` if it is not there yet)."""
    from transformers import CLIPTokenizer

    from gill.tiny import build_char_clip_tokenizer

    if not (directory / "vocab.json").exists():
        build_char_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory)


def encode_text(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids ``[N, 77]`` int64, padded to 77 as SD pads its prompts; raises if a caption does not fit."""
    encoded = tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=False,
                        return_tensors="pt").input_ids
    if encoded.shape[1] != CLIP_MAX_LENGTH:
        raise ValueError(f"a caption is longer than {CLIP_MAX_LENGTH - 2} characters: {max(captions, key=len)!r}")
    return encoded


def _describes(caption: str, scene: Scene) -> bool:
    return caption in (scene.caption, scene.short_caption)


def train_clip(world: World, config: CLIPTrainConfig, seed: int, tokenizer_dir: Path, progress: bool = True):
    """Train a ``transformers.CLIPModel`` on jittered images of ``world.train_scenes``; returns it (eval mode) and
    its image processor."""
    from tqdm.auto import tqdm
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, get_cosine_schedule_with_warmup

    tokenizer = char_tokenizer(tokenizer_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": world.size},
                                   crop_size={"height": world.size, "width": world.size})
    rng = random.Random(f"clip-{seed}")
    scenes = [rng.choice(world.train_scenes) for _ in range(config.images)]
    pixels = processor(images=[world.render(scene, rng) for scene in scenes], return_tensors="pt").pixel_values
    captions = sorted({text for scene in world.train_scenes for text in (scene.caption, scene.short_caption)})
    # Padded to the longest caption, not to 77: the text tower is causal, so the states up to the end token (the
    # pooled one, and every one SD attends to before it) are the same, at a third of the cost.
    caption_ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
    describes = torch.tensor([[_describes(c, scene) for c in captions] for scene in scenes], dtype=torch.bool)

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": config.text_width,
                     "intermediate_size": config.text_width * 4, "num_hidden_layers": config.text_layers,
                     "num_attention_heads": config.text_heads, "max_position_embeddings": CLIP_MAX_LENGTH,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": config.vision_width, "intermediate_size": config.vision_width * 4,
                       "num_hidden_layers": config.vision_layers, "num_attention_heads": config.vision_heads,
                       "image_size": world.size, "patch_size": config.patch_size},
        projection_dim=config.projection_dim))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(config.steps), desc="pocket CLIP", disable=not progress)
    for _ in bar:
        rows = torch.randint(len(scenes), (config.batch_size,), generator=generator)
        # One caption per image, drawn among those that describe it; the targets credit every describing caption.
        choice = torch.multinomial(describes[rows].float(), 1, generator=generator).squeeze(1)
        image_features = F.normalize(model.get_image_features(pixel_values=pixels[rows]).pooler_output, dim=-1)
        text_features = F.normalize(model.get_text_features(input_ids=caption_ids[choice]).pooler_output, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        targets = describes[rows][:, choice].float()
        loss = (F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdim=True))) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), processor


@torch.no_grad()
def clip_accuracy(model, processor, tokenizer, world: World, scenes: list[Scene], seed: int = 1) -> float:
    """Top-1 of each scene's image (a new jitter) against the full captions of every scene of the world."""
    from gill.pocket.world import all_scenes

    rng = random.Random(f"clip-eval-{seed}")
    candidates = all_scenes()
    ids = encode_text(tokenizer, [scene.caption for scene in candidates])
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    pixels = processor(images=[world.render(scene, rng) for scene in scenes], return_tensors="pt").pixel_values
    image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    best = (image @ text.T).argmax(1).numpy()
    return float(np.mean([candidates[b] == scene for b, scene in zip(best, scenes, strict=True)]))


def save_clip(model, processor, tokenizer, vision_dir: Path, text_dir: Path, tokenizer_dir: Path) -> None:
    """The vision tower as GILL's ``CLIPVisionModel`` (with its processor) in ``vision_dir``; the text tower as SD's
    ``CLIPTextModel`` in ``text_dir``; the tokenizer in ``tokenizer_dir``."""
    # transformers 5's CLIPModel holds the two towers as a CLIPVisionModel and a CLIPTextModel.
    model.vision_model.eval().save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)
    model.text_model.eval().save_pretrained(text_dir)
    tokenizer.save_pretrained(tokenizer_dir)
