"""GILL's training objective: the frozen LM and CLIP vision tower, the trainable adapters, and every loss.

One :meth:`GILLObjective.forward` follows the reference's recipe for a batch of caption-image pairs:

1. **Captioning view**: ``[4 visual prefix vectors] + BOS + caption``; LM cross-entropy on the caption tokens.
   With probability ``concat_captions_prob`` (one draw per batch, from the caller's generator) each row instead
   holds two samples, ``[prefix_i] BOS caption_i [prefix_j] caption_j`` with ``j = (i + 1) mod B``: a cyclic
   pairing, so the batch keeps ``B`` rows and every caption is trained once first and once second. This is the
   FROMAGe scheme the reference uses to mimic interleaved data. The second caption has no BOS, as at inference,
   where only the first text of a prompt gets one.
2. **Text view**: ``BOS + caption + [IMG0..7]`` with no image, the reference's retrieval and generation modes.
   They feed the LM the same ids and the frozen LM has no dropout, so one forward serves both: its
   cross-entropy on the caption tokens and ``[IMG0]`` (the ``[IMG]``-prediction loss) counts
   ``img_token_share * (ret_loss_scale + gen_loss_scale)`` times (0.5 + 0.5 at the defaults). Its ``[IMG]``
   last-layer states feed the next two losses.
3. **Contrastive loss** (x ``ret_loss_scale``): InfoNCE between the ``[IMG0]`` retrieval embedding and
   ``visual_fc`` of the CLIP pooler output.
4. **Generation loss** (x ``gen_loss_scale``): per-token Euclidean distance between the GILLMapper output and the
   Stable Diffusion text-encoder states of the caption (skipped when the batch has none).

The captioning loss is weighted by ``cap_loss_scale``; ``loss`` is the weighted sum.

Unlike the reference, the whole LM stays frozen, its embedding table and tied ``lm_head`` included. The 8 trained
``[IMG]`` rows live in ``adapters.input_embeddings`` and are substituted into the inputs and into the output
logits (OPT ties the two), so gradients reach only those rows and AdamW's decay cannot touch a pristine OPT row
(the reference decays all 50k rows, then serves with the originals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import CLIPVisionModel, OPTForCausalLM

from gill.adapters import ADAPTER_KEY_PREFIX, GILLAdapters
from gill.checkpoint import load_adapters
from gill.config import GILLArgs, resolve_source
from gill.convert import ADAPTERS_FILE
from gill.errors import CheckpointError, InputError
from gill.model import checkpoint_tokenizer, default_device, default_dtype, load_lm
from gill.tokens import SpecialTokens
from gill.training.batch import Batch
from gill.training.losses import IGNORE_INDEX, caption_cross_entropy, info_nce, l2_loss

FROZEN_DTYPES = (torch.float32, torch.bfloat16)  # fp16 would need loss scaling, which this objective does not do


@dataclass(frozen=True)
class LossWeights:
    """Loss weights; the names and defaults are the reference's ``--cap/ret/gen-loss-scale``.

    ``img_token_share`` is the weight of each of the retrieval and generation modes' LM cross-entropy (the
    reference's 0.5), so at the defaults the ``[IMG]``-prediction loss counts once, as in the paper.
    """

    cap_loss_scale: float = 1.0
    ret_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0
    img_token_share: float = 0.5

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"loss weight {name} must be a finite number >= 0, got {value}")


@dataclass
class SequenceView:
    """One LM input: ``embeddings`` ``[B, T, D]`` in the LM's dtype, ``attention_mask`` ``[B, T]`` int64
    (1 on real positions), ``labels`` ``[B, T]`` int64 (the token at each position, or ``IGNORE_INDEX``)."""

    embeddings: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


class GILLObjective(nn.Module):
    """The trainable GILL: frozen ``lm`` (OPT) and ``vision`` (CLIP), trainable fp32 ``adapters``.

    Build with :meth:`from_checkpoint`. ``forward`` returns the weighted ``loss`` and its parts; after each
    optimiser step call :meth:`renormalise_img_rows`, as the reference does.

    Mixed precision: the frozen models may be held in bf16 (``lm.dtype``); the adapters always stay fp32 master
    weights and the forward then runs under bf16 autocast, so the adapters' matmuls run in bf16 while their
    parameters, gradients and AdamW state stay fp32 (the reference casts the whole model, AdamW state included,
    to bf16). Losses are computed in fp32.
    """

    def __init__(self, lm: OPTForCausalLM, vision: CLIPVisionModel, adapters: GILLAdapters, tokens: SpecialTokens,
                 bos_id: int, weights: LossWeights = LossWeights(), concat_captions_prob: float = 0.5,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if not 0.0 <= concat_captions_prob <= 1.0:
            raise InputError(f"concat_captions_prob must lie in [0, 1], got {concat_captions_prob}")
        if lm.dtype not in FROZEN_DTYPES or vision.dtype != lm.dtype:
            raise InputError(f"the frozen models must share one dtype of {FROZEN_DTYPES}, got lm {lm.dtype} "
                             f"and vision {vision.dtype}")
        self.lm = lm
        self.vision = vision
        self.adapters = adapters.float().requires_grad_(True)
        self.tokens = tokens
        self.bos_id = bos_id
        self.weights = weights
        self.concat_captions_prob = concat_captions_prob
        self.gradient_checkpointing = False
        self._check_lm()
        for frozen in (self.lm, self.vision):
            frozen.requires_grad_(False)
        table = lm.get_input_embeddings().weight
        img_ids = torch.tensor(tokens.img, device=table.device)
        # id -> [IMG] slot (0..7), -1 for every other id: substitutes the trained rows in one gather.
        img_slot = torch.full((table.shape[0],), -1, dtype=torch.long, device=table.device)
        img_slot[img_ids] = torch.arange(len(tokens.img), device=table.device)
        other_rows = img_slot < 0
        self.register_buffer("img_ids", img_ids, persistent=False)
        self.register_buffer("img_slot", img_slot, persistent=False)
        # The frozen table never changes, so the norm the [IMG] rows are held at is computed once.
        self.register_buffer("img_row_norm", table.detach()[other_rows].float().norm(dim=1).mean(), persistent=False)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def _check_lm(self) -> None:
        table, head = self.lm.get_input_embeddings().weight, self.lm.get_output_embeddings().weight
        if head.data_ptr() != table.data_ptr():
            raise CheckpointError("the LM's lm_head is not tied to its input embeddings; GILL's [IMG] logits "
                                  "assume OPT's tied weights")
        if table.shape[1] != self.adapters.lm_width:
            raise CheckpointError(f"the LM's embedding width {table.shape[1]} differs from its hidden size "
                                  f"{self.adapters.lm_width} (an OPT with project_in/out); this is not supported")
        if self.adapters.input_embeddings.num_embeddings != len(self.tokens.img):
            raise CheckpointError(f"{self.adapters.input_embeddings.num_embeddings} trained [IMG] rows but "
                                  f"{len(self.tokens.img)} [IMG] tokens")
        if max(self.tokens.img) >= table.shape[0]:
            raise CheckpointError(f"[IMG] ids {self.tokens.img} lie outside the LM's {table.shape[0]}-row table")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None,
                        frozen_dtype: torch.dtype | None = None, weights: LossWeights = LossWeights(),
                        concat_captions_prob: float = 0.5, gradient_checkpointing: bool = False,
                        fresh_adapters: bool = False) -> GILLObjective:
        """Load the frozen base models a checkpoint directory names, and its adapters (or fresh ones).

        frozen_dtype: dtype of the frozen LM and vision tower; by default bf16 on CUDA, fp32 on the CPU.
        fresh_adapters: start from randomly initialised adapters (``torch``'s global RNG), as a new training run
            does; the directory then needs only ``model_args.json`` and the base models it names. The fresh
            ``[IMG]`` rows are scaled to the mean norm of the LM's rows, where training keeps them.
        """
        directory = Path(directory)
        args = GILLArgs.load(directory)
        device = torch.device(device) if device is not None else default_device()
        frozen_dtype = frozen_dtype or default_dtype(device)
        tokenizer, tokens = checkpoint_tokenizer(args, directory)
        # The rows of the added tokens are never read: [IMG] rows are substituted, <|image|> is never input.
        lm = load_lm(resolve_source(args.opt_version, directory), tokens, frozen_dtype)
        vision = CLIPVisionModel.from_pretrained(resolve_source(args.visual_encoder, directory), dtype=frozen_dtype)
        lm_width, vision_width = lm.config.hidden_size, vision.config.hidden_size
        if fresh_adapters:
            adapters = GILLAdapters(args, lm_width, vision_width)
        else:
            adapters = load_adapters(directory, args, lm_width, vision_width)
        objective = cls(lm, vision, adapters, tokens, tokenizer.bos_token_id, weights, concat_captions_prob,
                        gradient_checkpointing).to(device)
        if fresh_adapters:
            objective.renormalise_img_rows()
        return objective

    # ----------------------------------------------------------------------------------------------- state

    @property
    def device(self) -> torch.device:
        return self.adapters.logit_scale.device

    @property
    def frozen_dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def uses_autocast(self) -> bool:
        """True when the frozen models are bf16 and the forward runs under bf16 autocast."""
        return self.frozen_dtype != torch.float32

    def train(self, mode: bool = True) -> GILLObjective:
        """Train the adapters; the frozen models stay in eval mode (no dropout), as the reference keeps them.

        With gradient checkpointing the LM is put in train mode, because Hugging Face checkpoints a layer only
        then; its dropout was zeroed by :meth:`set_gradient_checkpointing`, so it computes what eval mode does.
        """
        super().train(mode)
        self.vision.eval()
        self.lm.train(mode and self.gradient_checkpointing)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the frozen LM's layer activations in the backward pass instead of storing them.

        Uses transformers' non-reentrant checkpointing, which back-propagates to ``inputs_embeds`` (the visual
        prefix and ``[IMG]`` rows) although no LM parameter requires grad.
        """
        if enabled:
            _zero_dropout(self.lm)
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif self.gradient_checkpointing:
            self.lm.activation_checkpointing_disable()
        self.gradient_checkpointing = enabled
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters: the only ones that require grad."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    @torch.no_grad()
    def renormalise_img_rows(self) -> None:
        """Scale each ``[IMG]`` row to the mean L2 norm of the LM's other (frozen) rows, as the reference does
        after every optimiser step, so the new tokens keep the scale of the vocabulary."""
        rows = self.adapters.input_embeddings.weight
        rows.mul_(self.img_row_norm / rows.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def adapter_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The adapters in the serving layout: ``gill_adapters.safetensors`` keys (``model.`` + the
        :class:`GILLAdapters` key), contiguous CPU tensors of ``dtype``."""
        return {ADAPTER_KEY_PREFIX + key: value.detach().to("cpu", dtype).contiguous()
                for key, value in self.adapters.state_dict().items()}

    def save_adapters(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write :meth:`adapter_state_dict` to ``directory/gill_adapters.safetensors`` and return its path.

        A checkpoint directory that is served also needs its ``SHA256SUMS`` refreshed
        (``gill.integrity.write_checksums``) and a decision head trained for these weights.
        """
        path = Path(directory) / ADAPTERS_FILE
        save_file(self.adapter_state_dict(dtype), str(path))
        return path

    # ------------------------------------------------------------------------------------------ the stages

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every loss of one batch (on this objective's device).

        Returns float32 scalars: ``caption_ce``, ``img_token_ce``, ``contrastive``, ``generation_l2`` (absent when
        ``batch.sd_targets`` is None), and their weighted sum ``loss``. A loss whose weight is 0 is not computed.
        generator: draws whether this batch's captioning view concatenates captions; a seeded one makes runs
            reproducible (the global RNG when None).
        """
        w = self.weights
        concat = self.draw_concat(generator)
        losses: dict[str, torch.Tensor] = {}
        scaled: list[torch.Tensor] = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_autocast):
            pooled = self.encode_images(batch.pixel_values)
            if w.cap_loss_scale > 0:
                prefix = self.adapters.visual_prefix(pooled)
                losses["caption_ce"] = self.caption_loss(prefix, batch.input_ids, batch.attention_mask, concat)
                scaled.append(w.cap_loss_scale * losses["caption_ce"])
            if w.ret_loss_scale > 0 or w.gen_loss_scale > 0:
                losses["img_token_ce"], img_states = self.text_view(batch.input_ids, batch.attention_mask)
                scaled.append(w.img_token_share * (w.ret_loss_scale + w.gen_loss_scale) * losses["img_token_ce"])
            if w.ret_loss_scale > 0:
                losses["contrastive"] = info_nce(self.adapters.text_retrieval_embedding(img_states),
                                                 self.adapters.image_retrieval_embedding(pooled),
                                                 self.adapters.logit_scale)
                scaled.append(w.ret_loss_scale * losses["contrastive"])
            if w.gen_loss_scale > 0 and batch.sd_targets is not None:
                losses["generation_l2"] = l2_loss(self.prompt_embeddings(img_states), batch.sd_targets)
                scaled.append(w.gen_loss_scale * losses["generation_l2"])
        if not scaled:
            raise InputError("every loss weight is 0; there is nothing to train")
        losses["loss"] = torch.stack(scaled).sum()
        return losses

    def draw_concat(self, generator: torch.Generator | None = None) -> bool:
        """One Bernoulli(``concat_captions_prob``) draw: whether this batch's captioning view concatenates."""
        device = generator.device if generator is not None else "cpu"
        return bool(torch.rand((), generator=generator, device=device) < self.concat_captions_prob)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` CLIP-normalised pixels -> ``[B, vision_width]`` float32 pooler output (no grad: frozen)."""
        return self.vision(pixel_values=pixel_values.to(self.device, self.frozen_dtype)).pooler_output.float()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` input embeddings in the LM's dtype: the frozen table's rows, with the
        trainable ``adapters.input_embeddings`` rows at ``[IMG]`` ids (the only rows with a gradient path)."""
        frozen = self.lm.get_input_embeddings()(input_ids)
        slots = self.img_slot[input_ids]
        trained = self.adapters.input_embeddings(slots.clamp(min=0)).to(frozen.dtype)
        return torch.where((slots >= 0)[..., None], trained, frozen)

    def lm_hidden_states(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` input embeddings -> ``[B, T, D]`` last-layer states (after OPT's final layer norm, i.e.
        ``hidden_states[-1]``, the states inference reads at ``[IMG]``)."""
        output = self.lm.model.decoder(inputs_embeds=embeddings.to(self.frozen_dtype), attention_mask=attention_mask,
                                       use_cache=False)
        return output.last_hidden_state

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` last-layer states -> ``[..., V]`` logits: the frozen ``lm_head`` for the vocabulary, and
        ``hidden @ img_rows.T`` for the ``[IMG]`` columns, which is what OPT's tied head computes once the trained
        rows are in its table."""
        frozen = self.lm.lm_head(hidden.to(self.frozen_dtype))
        img_rows = self.adapters.input_embeddings.weight
        img = nn.functional.linear(hidden.to(img_rows.dtype), img_rows)  # autocast runs it in bf16 when enabled
        return frozen.index_copy(-1, self.img_ids, img.to(frozen.dtype))

    def caption_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` number of leading BOS + caption tokens: everything before the first ``[IMG]`` or pad."""
        is_caption = attention_mask.bool() & (self.img_slot[input_ids] < 0)
        return is_caption.long().cumprod(dim=1).sum(dim=1)

    def caption_view(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     concat: bool) -> SequenceView:
        """The captioning input: per row ``[prefix_i] BOS caption_i`` or, with ``concat`` (and ``B > 1``),
        ``[prefix_i] BOS caption_i [prefix_j] caption_j`` with ``j = (i + 1) mod B``; right-padded.

        prefix: ``[B, n_visual_tokens, D]``. Labels are the caption ids (the BOS after the prefix included, as the
        reference's); the prefix vectors and padding are ``IGNORE_INDEX``. ``[IMG]`` tokens and padding after a
        caption are left out: they follow every labelled token, so a causal LM's loss does not see them.
        """
        embeddings = self.embed_tokens(input_ids)
        prefix = prefix.to(embeddings.dtype)
        lengths = self.caption_lengths(input_ids, attention_mask).tolist()
        no_labels = torch.full((prefix.shape[1],), IGNORE_INDEX, dtype=input_ids.dtype, device=input_ids.device)
        size = input_ids.shape[0]
        rows, labels = [], []
        for i in range(size):
            pieces = [(prefix[i], no_labels), (embeddings[i, :lengths[i]], input_ids[i, :lengths[i]])]
            if concat and size > 1:
                j = (i + 1) % size
                start = 1 if int(input_ids[j, 0]) == self.bos_id else 0
                pieces += [(prefix[j], no_labels), (embeddings[j, start:lengths[j]], input_ids[j, start:lengths[j]])]
            rows.append(torch.cat([piece for piece, _ in pieces]))
            labels.append(torch.cat([label for _, label in pieces]))
        lengths_t = torch.tensor([len(row) for row in rows], device=input_ids.device)
        mask = (torch.arange(int(lengths_t.max()), device=input_ids.device) < lengths_t[:, None]).long()
        return SequenceView(pad_sequence(rows, batch_first=True), mask,
                            pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX))

    def caption_loss(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     concat: bool) -> torch.Tensor:
        """Captioning cross-entropy (float32 scalar) of :meth:`caption_view`."""
        view = self.caption_view(prefix, input_ids, attention_mask, concat)
        hidden = self.lm_hidden_states(view.embeddings, view.attention_mask)
        return caption_cross_entropy(self.token_logits(hidden), view.labels)

    def img_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 8]`` positions of ``[IMG0..7]``; every row must hold them in order, contiguous and unmasked."""
        count = len(self.tokens.img)
        first = (input_ids == self.img_ids[0]).long().argmax(dim=1)
        positions = first[:, None] + torch.arange(count, device=input_ids.device)
        inside = positions[:, -1] < input_ids.shape[1]
        positions = positions.clamp(max=input_ids.shape[1] - 1)
        found = input_ids.gather(1, positions) == self.img_ids
        valid = inside & found.all(dim=1) & attention_mask.gather(1, positions).bool().all(dim=1)
        if not bool(valid.all()):
            bad = (~valid).nonzero().flatten().tolist()
            raise InputError(f"batch rows {bad[:8]} do not end their caption with [IMG0..7] "
                             f"(ids {list(self.tokens.img)}) in order and unmasked")
        return positions

    def text_view_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` labels of the text view: caption tokens and ``[IMG0]``; ``[IMG1..7]`` and padding ignored
        (the LM learns to emit ``[IMG0]``; the rest follow it at inference by construction)."""
        later_img = self.img_slot[input_ids] > 0
        keep = attention_mask.bool() & ~later_img
        return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    def text_view(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image-free ``caption + [IMG0..7]`` forward of the retrieval and generation modes.

        Returns the ``[IMG]``-prediction cross-entropy (float32 scalar) and the ``[B, 8, D]`` last-layer states at
        the ``[IMG]`` positions (the retrieval head and the mapper read them).
        """
        positions = self.img_positions(input_ids, attention_mask)
        hidden = self.lm_hidden_states(self.embed_tokens(input_ids), attention_mask)
        loss = caption_cross_entropy(self.token_logits(hidden), self.text_view_labels(input_ids, attention_mask))
        states = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return loss, states

    def prompt_embeddings(self, img_states: torch.Tensor) -> torch.Tensor:
        """``[B, 8, D]`` ``[IMG]`` states -> ``[B, 77, gen_emb_dim]`` GILLMapper output, with the trained ``[IMG]``
        rows as the residual input (the same rows inference reads from the LM's table)."""
        rows = self.adapters.input_embeddings.weight
        return self.adapters.prompt_embeddings(img_states, rows[None].expand(img_states.shape[0], -1, -1))


def _zero_dropout(module: nn.Module) -> None:
    """Set every dropout probability in ``module`` to 0, so that its train mode computes what eval mode does.

    Covers ``nn.Dropout`` modules and the float attributes Hugging Face layers pass to ``F.dropout`` (OPT:
    ``dropout`` and ``layerdrop`` on the decoder and its layers, ``dropout`` on attention).
    """
    for child in module.modules():
        if isinstance(child, nn.modules.dropout._DropoutNd):
            child.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(child, name, None), float):
                setattr(child, name, 0.0)
