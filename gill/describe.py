"""``gill describe``: the architecture and parameter counts of a config, without loading any weights.

Every module is built on PyTorch's meta device. Base-model shapes come from a local ``config.json``
when the source is a path, else from the table below (the public configs of the models GILL uses),
so describing the paper's config needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, OPTConfig

from gill.adapters import GILLAdapters, count_parameters, make_decision_head
from gill.config import GILLArgs, resolve_source
from gill.errors import CheckpointError

# (hidden, layers, heads, ffn) of the OPT family as published; OPT-350m's projections are not supported.
_OPT = {"125m": (768, 12, 12, 3072), "1.3b": (2048, 24, 32, 8192), "2.7b": (2560, 32, 32, 10240),
        "6.7b": (4096, 32, 32, 16384), "13b": (5120, 40, 40, 20480), "30b": (7168, 48, 56, 28672),
        "66b": (9216, 64, 72, 36864)}
# (hidden, layers, heads, ffn, patch) of the CLIP vision towers.
_CLIP = {"openai/clip-vit-large-patch14": (1024, 24, 16, 4096, 14),
         "openai/clip-vit-base-patch16": (768, 12, 12, 3072, 16),
         "openai/clip-vit-base-patch32": (768, 12, 12, 3072, 32)}


def _lm_config(source: str) -> OPTConfig:
    if Path(source).exists():
        return AutoConfig.from_pretrained(source)
    size = source.removeprefix("facebook/opt-")
    if size in _OPT:
        hidden, layers, heads, ffn = _OPT[size]
        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                         word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048)
    raise CheckpointError(f"unknown language model {source!r}: give a local path or one of "
                          f"{['facebook/opt-' + s for s in _OPT]}")


def _vision_config(source: str) -> CLIPVisionConfig:
    if Path(source).exists():
        return CLIPVisionConfig.from_pretrained(source)
    if source in _CLIP:
        hidden, layers, heads, ffn, patch = _CLIP[source]
        return CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=ffn, patch_size=patch, image_size=224)
    raise CheckpointError(f"unknown visual encoder {source!r}: give a local path or one of {sorted(_CLIP)}")


@dataclass(frozen=True)
class Description:
    args: GILLArgs
    rows: list[tuple[str, str, int, str]]  # (name, shape or note, parameters, kind)

    def total(self, kind: str) -> int:
        """Sum over rows of ``kind``: ``trainable``, ``frozen`` or ``separate`` (the decision head)."""
        return sum(count for _, _, count, row_kind in self.rows if row_kind == kind)


def describe(config: str | Path) -> Description:
    """Parameter counts per module; ``trainable`` is 50,096,385 for the paper's config."""
    path = Path(config)
    args = GILLArgs.load(path)
    directory = path if path.is_dir() else path.parent
    from transformers import CLIPVisionModel, OPTForCausalLM

    lm_config = _lm_config(resolve_source(args.opt_version, directory))
    vision_config = _vision_config(resolve_source(args.visual_encoder, directory))
    lm_width, vision_width = lm_config.hidden_size, vision_config.hidden_size
    with torch.device("meta"):
        adapters = GILLAdapters(args, lm_width, vision_width)
        lm = OPTForCausalLM(lm_config)
        vision = CLIPVisionModel(vision_config)
        decision = make_decision_head(lm_width)
    mapper = adapters.gen_text_hidden_fcs[0]
    rows = [
        ("visual_embeddings", f"Linear({vision_width} -> {args.n_visual_tokens} x {lm_width})",
         count_parameters(adapters.visual_embeddings), "trainable"),
        ("visual_fc", f"Linear({vision_width} -> {args.ret_emb_dim})", count_parameters(adapters.visual_fc),
         "trainable"),
        ("ret_text_hidden_fcs.0", f"Linear({lm_width} -> {args.ret_emb_dim}) at [IMG0]",
         count_parameters(adapters.ret_text_hidden_fcs), "trainable"),
        ("gen_text_hidden_fcs.0 (GILLMapper)",
         f"{lm_width} -> {args.mapper_hidden_dim}, Transformer {args.mapper_num_layers}+{args.mapper_num_layers} "
         f"layers, {args.num_clip_tokens} queries -> {args.gen_emb_dim}", count_parameters(mapper), "trainable"),
        ("  of which tfm", "nn.Transformer", count_parameters(mapper.tfm), "detail"),
        ("logit_scale", "scalar", 1, "trainable"),
        ("[IMG] embedding rows", f"{args.num_tokens} x {lm_width}", args.num_tokens * lm_width, "trainable"),
        ("decision head", f"Linear({lm_width} -> 2) on [IMG0]; trained apart", count_parameters(decision), "separate"),
        ("language model", f"{args.opt_version}: {lm_config.num_hidden_layers} layers x {lm_width}",
         count_parameters(lm), "frozen"),
        ("visual encoder", f"{args.visual_encoder}: {vision_config.num_hidden_layers} layers x {vision_width}",
         count_parameters(vision), "frozen"),
    ]
    return Description(args, rows)
