"""The assembled GILL model: frozen LM and CLIP vision encoder, the adapters, and the decision head.

Loading follows the reference's ``load_gill`` with its hazards removed: base models come from
``from_pretrained`` (hub id or local path), the adapters and decision head from safetensors, nothing is
unpickled, and any device works (CUDA in bf16 by default, the CPU in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    OPTForCausalLM,
    PreTrainedTokenizerBase,
)

from gill.adapters import DECISION_CLASSES, GILLAdapters
from gill.checkpoint import load_adapters, load_decision_head
from gill.config import GILLArgs, resolve_source
from gill.errors import CheckpointError, InputError
from gill.tokens import SpecialTokens, load_tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # The reference runs in bf16 on the GPU; the CPU is faster and exact in fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def checkpoint_tokenizer(args: GILLArgs, directory: Path) -> tuple[PreTrainedTokenizerBase, SpecialTokens]:
    """The checkpoint's tokenizer with GILL's tokens; raises if its ``[IMG]`` ids differ from the recorded ones."""
    tokenizer, tokens = load_tokenizer(resolve_source(args.tokenizer or args.opt_version, directory), args.num_tokens)
    if args.retrieval_token_idx and tuple(args.retrieval_token_idx) != tokens.img:
        raise CheckpointError(f"{directory}: model_args.json records [IMG] ids {list(args.retrieval_token_idx)} "
                              f"but the tokenizer gives {list(tokens.img)}; the tokenizer does not match")
    return tokenizer, tokens


def load_lm(source: str, tokens: SpecialTokens, dtype: torch.dtype) -> OPTForCausalLM:
    """The OPT LM with its embedding table sized to the tokenizer (GILL's added tokens included)."""
    lm = OPTForCausalLM.from_pretrained(source, dtype=dtype)
    if lm.get_input_embeddings().num_embeddings != tokens.vocab_size:
        # OPT-6.7B ships 50272 rows; the reference resizes to len(tokenizer) = 50274.
        lm.resize_token_embeddings(tokens.vocab_size, mean_resizing=False)
    return lm


@dataclass
class Decision:
    """Retrieve-or-generate for each image request; ``probabilities`` are (p_gen, p_ret)."""

    choices: list[str]
    probabilities: torch.Tensor | None  # [N, 2] float32, or None without a decision head


class GILL:
    """GILL's model parts on one device. Build with :meth:`from_checkpoint`."""

    def __init__(self, args: GILLArgs, tokenizer: PreTrainedTokenizerBase, tokens: SpecialTokens,
                 lm: OPTForCausalLM | None, vision: CLIPVisionModel | None, image_processor, adapters: GILLAdapters,
                 decision_head: torch.nn.Module | None, directory: Path | None = None) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.lm = lm
        self.vision = vision
        self.image_processor = image_processor
        self.adapters = adapters
        self.decision_head = decision_head
        self.directory = directory

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, parts: tuple[str, ...] = ("lm", "vision")) -> GILL:
        """Load GILL; ``parts`` picks the frozen base models to load (the adapters always load).

        A serving process that needs only some stages loads only those: the ``mapper`` model loads no base
        model, ``clip`` only the vision tower, ``llm`` only the language model.
        """
        unknown = set(parts) - {"lm", "vision"}
        if unknown:
            raise InputError(f"unknown parts {sorted(unknown)}; choose from lm, vision")
        directory = Path(directory)
        args = GILLArgs.load(directory)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        tokenizer, tokens = checkpoint_tokenizer(args, directory)
        lm_source = resolve_source(args.opt_version, directory)
        vision_source = resolve_source(args.visual_encoder, directory)
        lm = vision = image_processor = None
        if "lm" in parts:
            lm = load_lm(lm_source, tokens, dtype)
            lm_width = lm.config.hidden_size
        else:
            lm_width = AutoConfig.from_pretrained(lm_source).hidden_size
        if "vision" in parts:
            vision = CLIPVisionModel.from_pretrained(vision_source, dtype=dtype)
            image_processor = AutoImageProcessor.from_pretrained(vision_source)
            vision_width = vision.config.hidden_size
        else:
            vision_width = CLIPVisionConfig.from_pretrained(vision_source).hidden_size
        adapters = load_adapters(directory, args, lm_width, vision_width)
        if lm is not None:
            with torch.no_grad():
                # The [IMG] rows are the only trained rows; every other row keeps OPT's pristine weights.
                lm.get_input_embeddings().weight[list(tokens.img)] = adapters.input_embeddings.weight.to(dtype)
        decision_head = load_decision_head(directory, lm_width)
        model = cls(args, tokenizer, tokens, lm, vision, image_processor, adapters, decision_head, directory)
        return model.to(device, dtype)

    def to(self, device: torch.device, dtype: torch.dtype) -> GILL:
        for module in (self.lm, self.vision, self.adapters, self.decision_head):
            if module is not None:
                module.to(device=device, dtype=dtype).eval()
                module.requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.adapters.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapters.logit_scale.dtype

    @property
    def lm_width(self) -> int:
        return self.adapters.lm_width

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images -> (``[N, n_visual_tokens, lm_width]`` prefix, ``[N, ret_emb_dim]`` unit retrieval vectors)."""
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        pooled = self.vision(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return self.adapters.visual_prefix(pooled), self.adapters.image_retrieval_embedding(pooled)

    def tokenize(self, text: str, add_bos: bool) -> torch.Tensor:
        """``[T]`` token ids; BOS (``</s>``) first when ``add_bos``, as the reference's first text segment."""
        ids = self.tokenizer(text, add_special_tokens=add_bos, return_tensors="pt").input_ids[0]
        return ids

    @torch.inference_mode()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` ids -> ``[..., T, lm_width]`` input embeddings."""
        return self.lm.get_input_embeddings()(ids.to(self.device))

    @torch.inference_mode()
    def embed_prompt(self, ids: torch.Tensor, prefixes: torch.Tensor | None) -> torch.Tensor:
        """``[T]`` ids with -1 at image slots and ``[K, lm_width]`` prefixes -> ``[T, lm_width]`` embeddings."""
        slots = ids < 0
        count = int(slots.sum())
        if count != (0 if prefixes is None else prefixes.shape[0]):
            raise InputError(f"prompt has {count} image slots but {0 if prefixes is None else prefixes.shape[0]} "
                             "visual prefix vectors")
        embeds = self.embed_tokens(ids.clamp(min=0))
        if count:
            embeds[slots.to(embeds.device)] = prefixes.to(embeds.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def img_token_embeddings(self) -> torch.Tensor:
        """``[8, lm_width]`` input embeddings of ``[IMG0..7]`` (the mapper's residual input)."""
        if self.lm is None:  # the same rows the LM's table holds, kept by the adapters
            return self.adapters.input_embeddings.weight
        return self.embed_tokens(torch.tensor(self.tokens.img))

    @torch.inference_mode()
    def text_retrieval_embedding(self, img_states: torch.Tensor) -> torch.Tensor:
        """``[N, 8, lm_width]`` -> ``[N, ret_emb_dim]`` unit vectors (from the ``[IMG0]`` state only)."""
        return self.adapters.text_retrieval_embedding(img_states.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def decide(self, img_states: torch.Tensor) -> Decision:
        """Retrieve or generate, from the ``[IMG0]`` state; ``gen`` for all without a decision head."""
        if self.decision_head is None:
            return Decision(["gen"] * img_states.shape[0], None)
        logits = self.decision_head(img_states[:, 0].to(self.device, self.dtype)).float()
        probabilities = logits.softmax(dim=-1)
        return Decision([DECISION_CLASSES[i] for i in probabilities.argmax(dim=-1).tolist()], probabilities.cpu())

    @torch.inference_mode()
    def prompt_embeddings(self, img_states: torch.Tensor) -> torch.Tensor:
        """``[N, 8, lm_width]`` -> ``[N, 77, gen_emb_dim]`` Stable Diffusion ``prompt_embeds``."""
        states = img_states.to(self.device, self.dtype)
        residual = self.img_token_embeddings()[None].expand(states.shape[0], -1, -1)
        return self.adapters.prompt_embeddings(states, residual)
