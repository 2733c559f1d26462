"""Typed GILL configuration, read from the reference's ``model_args.json``.

The field names are the reference's own (``kohjingyu/gill``, ``checkpoints/gill_opt/model_args.json``),
so the official file loads unchanged. A few fields the reference hard-codes are exposed as optional
extensions with the paper's values as defaults, so that tiny test models can shrink them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gill.errors import CheckpointError

MODEL_ARGS_FILE = "model_args.json"

# Fields the reference writes that carry no meaning at inference (training switches); accepted and kept.
_TRAINING_ONLY_FIELDS = (
    "freeze_lm",
    "freeze_vm",
    "use_image_embed_norm",
    "image_embed_dropout_prob",
    "text_embed_dropout_prob",
    "mask_ret_token_loss",
    "no_concat_bos",
)


@dataclass(frozen=True)
class GILLArgs:
    """The model's architecture and base-model sources.

    Base-model fields (``opt_version``, ``visual_encoder``, ``sd_version``, ``tokenizer``) hold either a
    Hugging Face id or a path; a relative path is resolved against the checkpoint directory.
    """

    opt_version: str = "facebook/opt-6.7b"
    visual_encoder: str = "openai/clip-vit-large-patch14"
    # The reference hard-codes runwayml/stable-diffusion-v1-5, deleted from the hub in 2024; this is its mirror.
    sd_version: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Tokenizer source; the reference always uses the LM's own (``opt_version``).
    tokenizer: str | None = None
    n_visual_tokens: int = 4
    ret_emb_dim: int = 256
    gen_emb_dim: int = 768
    # Only the last layer (post final layer norm) is supported, as in every released GILL model.
    text_emb_layers: tuple[int, ...] = (-1,)
    text_fc_mode: str = "gill_mapper"
    ret_text_fc_mode: str = "linear"
    num_gen_tokens: int = 8
    num_ret_tokens: int = 8
    num_clip_tokens: int = 77
    share_ret_gen: bool = True
    norm_image_embed: str = "none"
    # Token ids the reference records; recomputed from the tokenizer at load and checked against these.
    retrieval_token_idx: tuple[int, ...] = ()
    gen_token_idx: tuple[int, ...] = ()
    # GILLMapper sizes, hard-coded in the reference (512 wide, 4 + 4 layers, 4 heads).
    mapper_hidden_dim: int = 512
    mapper_num_layers: int = 4
    mapper_num_heads: int = 4
    training_fields: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.text_emb_layers != (-1,):
            problems.append(f"text_emb_layers must be [-1] (last layer), got {list(self.text_emb_layers)}")
        if self.text_fc_mode != "gill_mapper":
            problems.append(f"text_fc_mode must be 'gill_mapper', got {self.text_fc_mode!r}")
        if self.ret_text_fc_mode != "linear":
            problems.append(f"ret_text_fc_mode must be 'linear', got {self.ret_text_fc_mode!r}")
        if not self.share_ret_gen or self.num_gen_tokens != self.num_ret_tokens:
            problems.append("only share_ret_gen=true with num_gen_tokens == num_ret_tokens is supported")
        if self.norm_image_embed != "none":
            problems.append(f"norm_image_embed must be 'none', got {self.norm_image_embed!r}")
        for name in ("n_visual_tokens", "ret_emb_dim", "gen_emb_dim", "num_gen_tokens", "num_clip_tokens",
                     "mapper_hidden_dim", "mapper_num_layers", "mapper_num_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.mapper_hidden_dim % self.mapper_num_heads:
            problems.append("mapper_hidden_dim must be divisible by mapper_num_heads")
        if problems:
            raise CheckpointError("invalid model args: " + "; ".join(problems))

    @property
    def num_tokens(self) -> int:
        """Number of ``[IMG]`` tokens (8 in the paper)."""
        return self.num_gen_tokens

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model args") -> GILLArgs:
        known = {f.name for f in dataclasses.fields(cls)} - {"training_fields"}
        training = {k: data[k] for k in _TRAINING_ONLY_FIELDS if k in data}
        unknown = sorted(set(data) - known - set(_TRAINING_ONLY_FIELDS))
        if unknown:
            raise CheckpointError(f"{source}: unknown fields {unknown}; allowed: {sorted(known)}")
        values = {k: v for k, v in data.items() if k in known}
        for name in ("text_emb_layers", "retrieval_token_idx", "gen_token_idx"):
            if name in values:
                values[name] = tuple(values[name])
        try:
            return cls(**values, training_fields=training)
        except (TypeError, CheckpointError) as error:
            raise CheckpointError(f"{source}: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> GILLArgs:
        """Read ``model_args.json`` from a file or a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_ARGS_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; a GILL checkpoint directory holds {MODEL_ARGS_FILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.training_fields)
        for f in dataclasses.fields(self):
            if f.name == "training_fields":
                continue
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MODEL_ARGS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=4) + "\n")
        return path


def resolve_source(value: str, checkpoint_dir: str | Path | None) -> str:
    """A base-model source as ``from_pretrained`` takes it: a local path when one exists, else a hub id."""
    if checkpoint_dir is not None:
        candidate = Path(checkpoint_dir) / value
        if candidate.exists():
            return str(candidate)
    return value
