"""The parts of a dialogue turn, behind one interface, so the same turn logic runs in-process or served.

:class:`Components` is what :class:`gill.pipeline.Pipeline` calls; :class:`LocalComponents` runs every part
in this process; the Triton orchestrator implements the same interface with calls to the ``clip``, ``llm``,
``mapper``, ``retrieval`` and ``diffusion`` models, so a served turn is the in-process turn, distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from gill.corpus import RetrievalSettings, open_retrieval
from gill.decoding import CancelCheck, Decoder, ImageStates, TokenStep
from gill.diffusion import ImageGenerator, PreviewCallback
from gill.model import GILL, Decision
from gill.options import GenerationOptions
from gill.retrieval import Hit, ImageStore, Retriever, first_loadable
from gill.tokens import SpecialTokens

IMAGE_SLOT = -1  # the id that marks a visual-prefix position in Prompt.ids


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt: ``ids`` ``[T]`` int64 with :data:`IMAGE_SLOT` where visual-prefix vectors go, and
    ``prefixes`` ``[K, lm_width]`` (K = n_visual_tokens per image, in order), or None without images."""

    ids: torch.Tensor
    prefixes: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class Components(Protocol):
    """What one turn needs; shapes as in :class:`gill.model.GILL`."""

    tokenizer: object
    tokens: SpecialTokens
    can_retrieve: bool
    can_generate: bool

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (``[N, n_visual_tokens, D]`` prefixes, ``[N, ret_emb_dim]`` unit retrieval vectors)."""
        ...

    def decode(self, prompt: Prompt, options: GenerationOptions,
               cancel: CancelCheck | None) -> Iterator[TokenStep | ImageStates]:
        """KV-cached decoding of one prompt (batch of one)."""
        ...

    def image_heads(self, states: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        """``[1, 8, D]`` -> (``[1, ret_emb_dim]`` unit text-side vector, the retrieve-or-generate decision)."""
        ...

    def prompt_embeddings(self, states: torch.Tensor) -> torch.Tensor:
        """``[1, 8, D]`` -> ``[1, 77, gen_emb_dim]``."""
        ...

    def retrieve(self, query: torch.Tensor, exclude: frozenset[int]) -> tuple[Hit, Image.Image] | None:
        """The best hit whose image loads, or None when the search finds nothing. Raises
        :class:`~gill.retrieval.RetrievalFailed` when no hit's image loads and
        :class:`~gill.retrieval.RetrievalUnavailable` when the backend is down."""
        ...

    def generate(self, prompt_embeds: torch.Tensor, options: GenerationOptions, cancel: Callable[[], bool],
                 on_preview: PreviewCallback) -> Image.Image | None:
        """An image, or None when cancelled."""
        ...


class LocalComponents:
    """Every part in this process, on one device."""

    def __init__(self, model: GILL, retriever: Retriever | None = None, generator: ImageGenerator | None = None,
                 image_store: ImageStore | None = None) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.tokens = model.tokens
        self.decoder = Decoder(model.lm, model.tokens)
        self.retriever = retriever
        self.generator = generator
        self.image_store = image_store or ImageStore(model.directory)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, load_diffusion: bool = True,
                        load_retrieval: bool = True, safety_checker: bool = False,
                        retrieval: RetrievalSettings | None = None) -> LocalComponents:
        directory = Path(directory)
        model = GILL.from_checkpoint(directory, device, dtype)
        retriever, store = None, ImageStore(directory)
        if load_retrieval:
            retriever, store = open_retrieval(directory, float(model.adapters.logit_scale), retrieval)
        generator = None
        if load_diffusion:
            generator = ImageGenerator.from_checkpoint(model.args, directory, model.device, model.dtype, safety_checker)
        return cls(model, retriever, generator, store)

    @property
    def can_retrieve(self) -> bool:
        return self.retriever is not None

    @property
    def can_generate(self) -> bool:
        return self.generator is not None

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_images(images)

    def decode(self, prompt: Prompt, options: GenerationOptions,
               cancel: CancelCheck | None) -> Iterator[TokenStep | ImageStates]:
        return self.decoder.stream([self.model.embed_prompt(prompt.ids, prompt.prefixes)], options, cancel)

    def image_heads(self, states: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        return self.model.text_retrieval_embedding(states), self.model.decide(states)

    def prompt_embeddings(self, states: torch.Tensor) -> torch.Tensor:
        return self.model.prompt_embeddings(states)

    def retrieve(self, query: torch.Tensor, exclude: frozenset[int]) -> tuple[Hit, Image.Image] | None:
        return first_loadable(self.retriever, self.image_store, query.cpu().numpy(), exclude)

    def generate(self, prompt_embeds: torch.Tensor, options: GenerationOptions, cancel: Callable[[], bool],
                 on_preview: PreviewCallback) -> Image.Image | None:
        return self.generator.generate(
            prompt_embeds, scheduler=options.scheduler, guidance_scale=options.guidance_scale,
            num_inference_steps=options.num_inference_steps, seed=options.seed, cancel=cancel, on_preview=on_preview,
            preview_every=options.preview_every)
