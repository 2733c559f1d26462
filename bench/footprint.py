"""Memory footprint of the paper-scale GILL stack, counted exactly from the real modules on the ``meta`` device.

    python bench/footprint.py                   # prints the table (no GPU, no weights: about 10 s on a CPU)
    python bench/footprint.py --write           # also records it in docs/benchmarks.md

Every component is built from its published configuration (OPT-6.7B with GILL's added tokens, CLIP ViT-L/14's
vision tower, Stable Diffusion v1.5's UNet, VAE and text encoder, GILL's adapters at the paper's sizes) on the
``meta`` device, so shapes are real but nothing is allocated. Bytes are parameters plus buffers as the project
loads them: 2 bytes an element (LM and CLIP in bf16, diffusion in fp16, see ``gill.model.default_dtype`` and
``gill.diffusion``) against 4 in fp32; integer buffers keep their own size. The same shape definitions feed
``bench/gpu_paper_scale.py``, which measures the peak on a real GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gill.adapters import GILLAdapters, make_decision_head
from gill.config import GILLArgs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import record  # noqa: E402  (the shared docs writer)

MARK = "footprint"
GIB = 2**30


@dataclass(frozen=True)
class StackShapes:
    """Configurations of every module of the served stack, as keyword arguments of their classes.

    ``paper`` is the released model's stack; ``tiny`` runs the same code paths on a CPU in seconds.
    """

    name: str
    lm: dict[str, Any]  # transformers.OPTConfig
    vision: dict[str, Any]  # transformers.CLIPVisionConfig
    text_encoder: dict[str, Any]  # transformers.CLIPTextConfig (SD's; encodes the empty negative prompt)
    unet: dict[str, Any]  # diffusers.UNet2DConditionModel
    vae: dict[str, Any]  # diffusers.AutoencoderKL
    scheduler: dict[str, Any]  # diffusers.PNDMScheduler (SD v1.5's own scheduler config)
    gill: dict[str, Any] = field(default_factory=dict)  # GILLArgs overrides (the paper's values by default)

    @property
    def args(self) -> GILLArgs:
        return GILLArgs(**self.gill)

    @property
    def img_token_ids(self) -> tuple[int, ...]:
        """``[IMG0..7]`` are the last rows of the resized embedding (50266-50273 for OPT)."""
        vocab, count = self.lm["vocab_size"], self.args.num_tokens
        return tuple(range(vocab - count, vocab))

    @property
    def image_size(self) -> int:
        """Generated image side in pixels: latent side times the VAE's downsampling (64 * 8 = 512)."""
        return self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


# Stable Diffusion v1.5's scheduler config (scheduler/scheduler_config.json); also what the reference runs.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)

PAPER = StackShapes(
    name="paper",
    # facebook/opt-6.7b; the tokenizer has 50265 tokens, GILL adds <|image|> and [IMG0..7] and resizes the
    # embedding (tied to the LM head) to 50274 rows, above the checkpoint's padded 50272.
    lm=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, vocab_size=50274,
            max_position_embeddings=2048, word_embed_proj_dim=4096, do_layer_norm_before=True,
            pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0),
    # openai/clip-vit-large-patch14, vision tower only (GILL reads its 1024-d pooler output).
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    # stable-diffusion-v1-5 text_encoder/config.json.
    text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # stable-diffusion-v1-5 unet/config.json.
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
    # stable-diffusion-v1-5 vae/config.json.
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    scheduler=SD15_SCHEDULER,
)

TINY = StackShapes(
    name="tiny",
    # Same module types, widths cut so that the whole benchmark runs on two CPU cores in seconds.
    lm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, vocab_size=520,
            max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
            pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu"),
    # 514 ids: the character-level CLIP tokenizer of gill.tiny (bos 512, eos 513).
    text_encoder=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513),
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
              cross_attention_dim=32, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             norm_num_groups=4, sample_size=16, scaling_factor=0.18215),
    scheduler=SD15_SCHEDULER,
    gill=dict(gen_emb_dim=32, mapper_hidden_dim=16, mapper_num_layers=1, mapper_num_heads=2),
)

SHAPES = {shapes.name: shapes for shapes in (PAPER, TINY)}


# Builders: each constructs one module in the current default device and dtype (meta here, CUDA in the GPU bench).

def build_lm(shapes: StackShapes) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(**shapes.lm)).eval()


def build_vision(shapes: StackShapes) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**shapes.vision)).eval()


def build_text_encoder(shapes: StackShapes) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**shapes.text_encoder)).eval()


def build_unet(shapes: StackShapes) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**shapes.unet).eval()


def build_vae(shapes: StackShapes) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**shapes.vae).eval()


def build_adapters(shapes: StackShapes) -> nn.Module:
    return GILLAdapters(shapes.args, shapes.lm["hidden_size"], shapes.vision["hidden_size"]).eval()


def build_decision_head(shapes: StackShapes) -> nn.Module:
    return make_decision_head(shapes.lm["hidden_size"]).eval()


def build_safety_checker(shapes: StackShapes) -> nn.Module:
    """SD's NSFW checker (a second CLIP ViT-L/14 vision tower); the reference loads it, this project only on request."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    vision = {k: v for k, v in shapes.vision.items() if k != "projection_dim"}
    config = CLIPConfig(text_config=shapes.text_encoder, vision_config=vision, projection_dim=768)
    return StableDiffusionSafetyChecker(config).eval()


@dataclass(frozen=True)
class Component:
    name: str
    build: Any
    note: str
    loaded: bool = True  # False: listed for comparison, not part of the served stack's total


COMPONENTS = (
    Component("OPT-6.7B language model", build_lm, "bf16; 50274-row embedding (8 `[IMG]` rows added), tied LM head"),
    Component("CLIP ViT-L/14 vision tower", build_vision, "bf16; 224 px, pooler output 1024-d"),
    Component("GILL adapters (mapper, projections)", build_adapters,
              "bf16; 4+4-layer 512-wide mapper to 77x768, visual prefix, retrieval heads"),
    Component("decision head", build_decision_head, "bf16; Linear(4096, 2)"),
    Component("SD v1.5 UNet", build_unet, "fp16; batch 2 under classifier-free guidance"),
    Component("SD v1.5 VAE", build_vae, "fp16; only the decoder runs when serving"),
    Component("SD v1.5 CLIP text encoder", build_text_encoder,
              "fp16; encodes the empty negative prompt once (the mapper replaces it for prompts)"),
    Component("SD safety checker", build_safety_checker, "fp16; the reference loads it, here opt-in", loaded=False),
)


def tensor_bytes(module: nn.Module, floating_bytes: int) -> tuple[int, int]:
    """(element count, bytes) of parameters and buffers; floating tensors cost ``floating_bytes`` an element."""
    elements = total = 0
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:  # parameters() already skips tied weights; buffers may be shared too
            continue
        seen.add(id(tensor))
        elements += tensor.numel()
        total += tensor.numel() * (floating_bytes if tensor.is_floating_point() else tensor.element_size())
    return elements, total


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kv_bytes_per_token(shapes: StackShapes, element_bytes: int = 2) -> int:
    """Keys and values of every layer for one token: ``2 * layers * hidden * element_bytes`` (0.5 MiB for OPT-6.7B)."""
    return 2 * shapes.lm["num_hidden_layers"] * shapes.lm["hidden_size"] * element_bytes


def measure(shapes: StackShapes = PAPER) -> dict[str, Any]:
    """Parameter counts and bytes of every component, built on the ``meta`` device."""
    rows = []
    with torch.device("meta"):
        for component in COMPONENTS:
            module = component.build(shapes)
            elements, half = tensor_bytes(module, 2)
            _, full = tensor_bytes(module, 4)
            rows.append(dict(name=component.name, note=component.note, loaded=component.loaded,
                             parameters=parameter_count(module), elements=elements, bytes_16bit=half, bytes_fp32=full))
            del module
    return dict(shapes=shapes.name, components=rows, kv_bytes_per_token=kv_bytes_per_token(shapes),
                window=shapes.lm["max_position_embeddings"])


def fit(result: dict[str, Any], card_gib: float, headroom_gib: float) -> dict[str, Any]:
    """How the loaded stack fits a ``card_gib`` card once ``headroom_gib`` is set aside for activations."""
    loaded = [row for row in result["components"] if row["loaded"]]
    weights_16 = sum(row["bytes_16bit"] for row in loaded)
    weights_32 = sum(row["bytes_fp32"] for row in loaded)
    dialogue = result["kv_bytes_per_token"] * result["window"]
    spare = card_gib * GIB - weights_16 - headroom_gib * GIB
    return dict(card_gib=card_gib, headroom_gib=headroom_gib, weights_16bit=weights_16, weights_fp32=weights_32,
                kv_bytes_per_dialogue=dialogue, spare_bytes=spare, fits=spare >= 0,
                fits_fp32=card_gib * GIB - weights_32 - headroom_gib * GIB >= 0,
                full_window_dialogues=max(0, math.floor(spare / dialogue)))


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def markdown(result: dict[str, Any], verdict: dict[str, Any], command: str) -> str:
    window = result["window"]
    lines = [
        f"<!-- {MARK} -->",
        f"### Memory footprint of the paper-scale stack (`{command}`)",
        "",
        "Counted exactly from the real modules built on PyTorch's `meta` device from the published configurations "
        "(parameters plus buffers; no weights loaded). 16-bit is how the project loads them on a GPU "
        "(LM, CLIP and adapters bf16, Stable Diffusion fp16); fp32 for comparison.",
        "",
        "| component | parameters | 16-bit GiB | fp32 GiB | note |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["components"]:
        if row["loaded"]:
            lines.append(f"| {row['name']} | {row['parameters']:,} | {gib(row['bytes_16bit'])} | "
                         f"{gib(row['bytes_fp32'])} | {row['note']} |")
    loaded = [row for row in result["components"] if row["loaded"]]
    lines.append(f"| **total loaded** | **{sum(r['parameters'] for r in loaded):,}** | "
                 f"**{gib(verdict['weights_16bit'])}** | **{gib(verdict['weights_fp32'])}** | |")
    for row in result["components"]:
        if not row["loaded"]:
            lines.append(f"| ({row['name']}, not loaded) | {row['parameters']:,} | {gib(row['bytes_16bit'])} | "
                         f"{gib(row['bytes_fp32'])} | {row['note']} |")
    per_token = result["kv_bytes_per_token"]
    dialogue = verdict["kv_bytes_per_dialogue"]
    lines += [
        "",
        f"KV cache (16-bit): 2 x {PAPER.lm['num_hidden_layers']} layers x {PAPER.lm['hidden_size']} x 2 bytes = "
        f"**{per_token / 2**20:.2f} MiB per token**; one full {window}-token dialogue = **{gib(dialogue)} GiB**; "
        + ", ".join(f"{n} dialogues = {gib(n * dialogue)} GiB" for n in (4, 8, 16)) + ".",
        "",
        f"On a {verdict['card_gib']:.0f} GiB card with {verdict['headroom_gib']:.1f} GiB set aside for the CUDA "
        f"context, activations (UNet batch 2, VAE decode at 512 px) and allocator slack: 16-bit weights "
        f"{gib(verdict['weights_16bit'])} GiB -> "
        + (f"**fits**, {gib(verdict['spare_bytes'])} GiB left = **{verdict['full_window_dialogues']} concurrent "
           f"full-window ({window}-token) dialogues** of KV cache"
           if verdict["fits"] else f"**does not fit** ({gib(-verdict['spare_bytes'])} GiB short)")
        + f". In fp32 the weights alone ({gib(verdict['weights_fp32'])} GiB) "
        + ("fit." if verdict["fits_fp32"] else "do not fit.")
        + " The reference's \"at least 22 GB\" also holds the safety checker and the CC3M retrieval matrix on the "
        "GPU; here retrieval stays on the CPU (NumPy or Milvus) and the safety checker is opt-in.",
        f"<!-- /{MARK} -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card-gib", type=float, default=24.0, help="GPU memory to fit (24: RTX 3090/4090, A10G)")
    parser.add_argument("--headroom-gib", type=float, default=2.0,
                        help="kept free for the CUDA context, activations and fragmentation")
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args(argv)
    result = measure(PAPER)
    verdict = fit(result, args.card_gib, args.headroom_gib)
    command = "python bench/footprint.py" + (f" --card-gib {args.card_gib:g}" if args.card_gib != 24 else "") + (
        f" --headroom-gib {args.headroom_gib:g}" if args.headroom_gib != 2 else "")
    table = markdown(result, verdict, command)
    print(table)
    if args.write:
        record(table, MARK)
    return dict(result, fit=verdict)


if __name__ == "__main__":
    main()
