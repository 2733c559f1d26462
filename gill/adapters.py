"""GILL's trainable modules, with the reference's structure and state-dict keys.

Every trainable tensor of the paper lives here; the language model, CLIP and Stable Diffusion stay
frozen and are loaded from their own sources. ``GILLAdapters.state_dict()`` keys, with the ``model.``
prefix of :data:`ADAPTER_KEY_PREFIX`, are the keys of the official ``pretrained_ckpt.pth.tar``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from gill.config import GILLArgs

ADAPTER_KEY_PREFIX = "model."
DECISION_CLASSES = ("gen", "ret")  # index 0 = generate, 1 = retrieve, as the reference's classifier


class RetrievalProjection(nn.Module):
    """The reference's ``TextFcLayer(mode='linear')``: one linear map, output kept only at ``[IMG0]``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.model = nn.Linear(in_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, 8, D]`` last-layer states at the ``[IMG]`` positions -> ``[N, ret_emb_dim]`` (not normalised)."""
        return self.model(hidden_states[:, 0])


class GILLMapper(nn.Module):
    """Maps the 8 ``[IMG]`` states to Stable Diffusion's text-encoder space.

    The reference's ``TextFcLayer(mode='gill_mapper')``: states plus the ``[IMG]`` input embeddings,
    a linear map to ``hidden_dim``, an encoder-decoder ``nn.Transformer`` whose decoder reads
    ``num_output_tokens`` learned queries, and a linear map to ``out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_output_tokens: int, hidden_dim: int = 512,
                 num_layers: int = 4, num_heads: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden_dim)
        with warnings.catch_warnings():  # nested tensors do not apply to norm_first layers; torch warns about it
            warnings.simplefilter("ignore", UserWarning)
            self.tfm = nn.Transformer(
                d_model=hidden_dim, nhead=num_heads, num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                dim_feedforward=hidden_dim * 4, dropout=0.0, norm_first=True, batch_first=True)
        self.model = nn.Linear(hidden_dim, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden_dim))

    def forward(self, hidden_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, 8, D]`` states and ``[N, 8, D]`` ``[IMG]`` input embeddings -> ``[N, 77, gen_emb_dim]``."""
        x = self.fc(hidden_states + token_embeddings)
        queries = self.query_embs.expand(x.shape[0], -1, -1)
        return self.model(self.tfm(x, queries))


class GILLAdapters(nn.Module):
    """All trainable parameters of GILL (50,096,385 at the paper's sizes).

    ``lm_width`` is the language model's hidden size (4096 for OPT-6.7B) and ``vision_width`` the CLIP
    vision pooler size (1024 for ViT-L/14).
    """

    def __init__(self, args: GILLArgs, lm_width: int, vision_width: int) -> None:
        super().__init__()
        self.args = args
        self.lm_width = lm_width
        # Input side: CLIP pooler -> n_visual_tokens prefix vectors of LM width.
        self.visual_embeddings = nn.Linear(vision_width, lm_width * args.n_visual_tokens)
        # Retrieval: image side from the CLIP pooler, text side from the [IMG0] state.
        self.visual_fc = nn.Linear(vision_width, args.ret_emb_dim)
        self.ret_text_hidden_fcs = nn.ModuleList([RetrievalProjection(lm_width, args.ret_emb_dim)])
        self.gen_text_hidden_fcs = nn.ModuleList([GILLMapper(
            lm_width, args.gen_emb_dim, args.num_clip_tokens, args.mapper_hidden_dim,
            args.mapper_num_layers, args.mapper_num_heads)])
        # CLIP-style learnable temperature, initialised to 1/0.07.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # The trained rows of the [IMG0..7] tokens; copied into the LM's embedding table at load.
        self.input_embeddings = nn.Embedding(args.num_tokens, lm_width)

    def visual_prefix(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N, vision_width]`` CLIP pooler output -> ``[N, n_visual_tokens, lm_width]``."""
        return self.visual_embeddings(pooled).reshape(pooled.shape[0], self.args.n_visual_tokens, self.lm_width)

    def image_retrieval_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N, vision_width]`` -> ``[N, ret_emb_dim]`` L2-normalised image-side retrieval vector."""
        return nn.functional.normalize(self.visual_fc(pooled), dim=-1)

    def text_retrieval_embedding(self, img_states: torch.Tensor) -> torch.Tensor:
        """``[N, 8, lm_width]`` ``[IMG]`` states -> ``[N, ret_emb_dim]`` L2-normalised text-side vector."""
        return nn.functional.normalize(self.ret_text_hidden_fcs[0](img_states), dim=-1)

    def prompt_embeddings(self, img_states: torch.Tensor, img_token_embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, 8, lm_width]`` states and ``[IMG]`` input embeddings -> ``[N, 77, gen_emb_dim]`` SD prompt_embeds."""
        return self.gen_text_hidden_fcs[0](img_states, img_token_embeddings)


def make_decision_head(lm_width: int) -> nn.Sequential:
    """The retrieve-or-generate classifier on the ``[IMG0]`` state: logits ``[N, 2]`` over (gen, ret)."""
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(lm_width, len(DECISION_CLASSES)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
