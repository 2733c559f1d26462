"""Offline, deterministic checkpoints in the real layout, with random weights.

``tiny`` drives the tests on the CPU in seconds. ``small`` has realistic widths (OPT-125m and
CLIP ViT-B/16 shapes, a 50,265-entry vocabulary so the added-token ids equal the real ones) for CPU
benchmarks. Both write the official file formats (``pretrained_ckpt.pth.tar``, ``decision_model.pth.tar``,
``cc3m_embeddings_urls.npy``) and then run the same converter that the real weights go through.

Usage::

    gill make-tiny /tmp/gill-tiny --seed 0
    gill make-tiny /tmp/gill-small --preset small
"""

from __future__ import annotations

import itertools
import json
import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gill.adapters import ADAPTER_KEY_PREFIX, GILLAdapters, make_decision_head
from gill.config import GILLArgs
from gill.errors import InputError

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Preset:
    """Sizes of one synthetic checkpoint; field comments say why a value was chosen."""

    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_max_positions: int
    # Pad the BPE vocabulary to this size so the added-token ids match OPT's (50265 -> <|image|>).
    vocab_pad_to: int | None
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    # SD text-encoder width = UNet cross-attention width = the mapper's output width (768 in SD v1.5).
    gen_emb_dim: int
    mapper_hidden_dim: int
    mapper_num_layers: int
    mapper_num_heads: int
    unet_channels: tuple[int, int]
    sd_image_size: int
    retrieval_images: int = 24


PRESETS = {
    # Small enough that building it and a whole dialogue turn take about a second on two cores.
    "tiny": Preset(lm_width=64, lm_layers=2, lm_heads=4, lm_max_positions=256, vocab_pad_to=None,
                   vision_width=32, vision_layers=2, vision_heads=2, image_size=32, patch_size=8,
                   gen_emb_dim=32, mapper_hidden_dim=32, mapper_num_layers=1, mapper_num_heads=2,
                   unet_channels=(8, 16), sd_image_size=32),
    # OPT-125m and CLIP ViT-B/16 shapes; the paper's mapper; SD kept small (diffusion is benchmarked apart).
    "small": Preset(lm_width=768, lm_layers=12, lm_heads=12, lm_max_positions=2048, vocab_pad_to=50265,
                    vision_width=768, vision_layers=12, vision_heads=12, image_size=224, patch_size=16,
                    gen_emb_dim=768, mapper_hidden_dim=512, mapper_num_layers=4, mapper_num_heads=4,
                    unet_channels=(32, 64), sd_image_size=64),
}


def synthetic_captions(seed: int = 0) -> list[str]:
    """Captions of the shapes world, used to train the BPE tokenizer and to caption retrieval images."""
    rng = random.Random(seed)
    captions = [f"a {c} {s} on a {b} background" for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]
    rng.shuffle(captions)
    return captions


def _tokenizer_corpus() -> list[str]:
    lines = synthetic_captions()
    lines += [f"Q: show me {c}\nA: here is {c}." for c in lines[:200]]
    lines += ["A picture of a dog. Can you show me a picture of a cat? Sure, here it is. What is this?"] * 5
    return lines


def build_tokenizer(directory: Path, vocab_pad_to: int | None, lines: list[str] | None = None,
                    vocab_size: int = 2000) -> None:
    """Train a byte-level BPE offline (on ``lines``, default the shapes captions and a few dialogues) and save it
    where ``AutoTokenizer`` loads it as OPT's ``GPT2Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_tokenizer_corpus() if lines is None else lines, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    if vocab_pad_to is not None:
        vocab_path = directory / "vocab.json"
        vocab = json.loads(vocab_path.read_text())
        for index in range(len(vocab), vocab_pad_to):
            vocab[f"<unused{index}>"] = index
        vocab_path.write_text(json.dumps(vocab))
    # OPT's special tokens: BOS = EOS = UNK = "</s>" (id 2), PAD = "<pad>" (id 1); BOS is prepended.
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True, "add_prefix_space": False, "model_max_length": 1_000_000,
    }, indent=2))


def build_char_clip_tokenizer(directory: Path) -> None:
    """A character-level CLIP tokenizer (no merges): every character is a token, so any short prompt fits in 77."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))


def _build_lm(directory: Path, preset: Preset, vocab_size: int, seed: int) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=preset.lm_width, num_hidden_layers=preset.lm_layers,
        ffn_dim=preset.lm_width * 4, num_attention_heads=preset.lm_heads,
        max_position_embeddings=preset.lm_max_positions, word_embed_proj_dim=preset.lm_width,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    OPTForCausalLM(config).save_pretrained(directory)


def _build_vision(directory: Path, preset: Preset, seed: int) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=preset.vision_width, intermediate_size=preset.vision_width * 4,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=preset.image_size, patch_size=preset.patch_size, projection_dim=preset.vision_width)
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
    ).save_pretrained(directory)


def _build_sd(directory: Path, preset: Preset, seed: int) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    small, large = preset.unet_channels
    unet = UNet2DConditionModel(
        sample_size=preset.sd_image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(small, large), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=preset.gen_emb_dim,
        attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(small, large),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=preset.sd_image_size)
    text_config = CLIPTextConfig(
        vocab_size=514, hidden_size=preset.gen_emb_dim, intermediate_size=preset.gen_emb_dim * 2,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, bos_token_id=512,
        eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(text_config)
    # Stable Diffusion v1.5's own scheduler configuration (PNDM, scaled-linear betas).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    build_char_clip_tokenizer(directory / "tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer_src")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    for leftover in (directory / "tokenizer_src").iterdir():
        leftover.unlink()
    (directory / "tokenizer_src").rmdir()


def shape_image(colour: str, shape: str, background: str, size: int) -> Image.Image:
    """One image of the shapes world: a ``shape`` in ``colour`` centred on a ``background``."""
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    margin = size // 5
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        corners = [(size // 2, margin), (size - margin, size - margin), (margin, size - margin)]
        draw.polygon(corners, fill=COLOURS[colour])
    return image


def _write_official_files(directory: Path, preset: Preset, args: GILLArgs, tokenizer_size: int, seed: int) -> None:
    """Random adapters and a retrieval corpus, written in the official (pickle) formats."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    torch.manual_seed(seed)
    adapters = GILLAdapters(args, preset.lm_width, preset.vision_width)
    # Random [IMG] rows at the scale of the LM's embedding rows, as training would leave them.
    torch.nn.init.normal_(adapters.input_embeddings.weight, std=0.02)
    state = OrderedDict((ADAPTER_KEY_PREFIX + k, v.to(torch.bfloat16)) for k, v in adapters.state_dict().items())
    torch.save({"state_dict": state}, directory / "pretrained_ckpt.pth.tar")
    decision = make_decision_head(preset.lm_width)
    torch.save({"state_dict": decision.state_dict()}, directory / "decision_model.pth.tar")

    # Retrieval corpus: images on disk, embedded the way scripts/extract_img_embs.py does it.
    vision = CLIPVisionModel.from_pretrained(directory / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(directory / "clip")
    captions = synthetic_captions(seed)[: preset.retrieval_images]
    paths, embeddings = [], []
    (directory / "retrieval_images").mkdir(exist_ok=True)
    for index, caption in enumerate(captions):
        words = caption.split()
        image = shape_image(words[1], words[2], words[5], preset.image_size)
        relative = f"retrieval_images/{index:05d}.png"
        image.save(directory / relative)
        pixels = processor(images=image, return_tensors="pt").pixel_values
        with torch.no_grad():
            pooled = vision(pixel_values=pixels).pooler_output
            embeddings.append(adapters.visual_fc(pooled)[0].numpy().astype(np.float32))
        paths.append(relative)
    with open(directory / "cc3m_embeddings_urls.npy", "wb") as handle:
        pickle.dump({"paths": paths, "embeddings": embeddings}, handle)
    (directory / "retrieval_captions.json").write_text(json.dumps(dict(zip(paths, captions, strict=False)), indent=1))


def make_checkpoint(directory: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Build a complete checkpoint directory offline; same seed and preset -> same weights."""
    from gill.convert import convert_directory
    from gill.integrity import write_checksums
    from gill.tokens import load_tokenizer

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    sizes = PRESETS[preset]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(directory / "lm", sizes.vocab_pad_to)
    args = replace(
        GILLArgs(), opt_version="lm", visual_encoder="clip", sd_version="sd", gen_emb_dim=sizes.gen_emb_dim,
        mapper_hidden_dim=sizes.mapper_hidden_dim, mapper_num_layers=sizes.mapper_num_layers,
        mapper_num_heads=sizes.mapper_num_heads)
    _, tokens = load_tokenizer(str(directory / "lm"), args.num_tokens)
    args = replace(args, retrieval_token_idx=tokens.img, gen_token_idx=tokens.img)
    args.save(directory)
    _build_lm(directory / "lm", sizes, tokens.vocab_size, seed + 1)
    _build_vision(directory / "clip", sizes, seed + 2)
    _build_sd(directory / "sd", sizes, seed + 3)
    _write_official_files(directory, sizes, args, tokens.vocab_size, seed + 4)
    convert_directory(directory, checksums=False)
    write_checksums(directory)  # all of it: a rebuild over an older directory leaves no stale line
    return directory


def default_home() -> Path:
    """Where ``gill`` keeps what it builds on first use: ``$GILL_HOME`` or ``~/.cache/gill``."""
    import os

    return Path(os.environ.get("GILL_HOME") or Path.home() / ".cache" / "gill")


def ensure_tiny_checkpoint(directory: Path | None = None, seed: int = 0) -> Path:
    """The tiny checkpoint, built on first use (a marker file guards against a half-built directory)."""
    from gill.integrity import CHECKSUMS_FILE, write_checksums

    directory = directory or default_home() / f"tiny-seed{seed}"
    marker = directory / ".complete"
    if not marker.exists():
        make_checkpoint(directory, seed=seed)
        marker.write_text("built by gill make-tiny\n")
    elif not (directory / CHECKSUMS_FILE).exists():
        write_checksums(directory)  # built by a gill from before SHA256SUMS: record it as it is
    return directory
