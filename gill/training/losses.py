"""GILL's training losses as pure functions of tensors.

- :func:`caption_cross_entropy`: next-token cross-entropy with ``-100`` labels ignored (captioning and the
  ``[IMG]``-prediction loss).
- :func:`info_nce`: CLIP's symmetric contrastive loss with a learnable temperature; under ``torch.distributed``
  the embeddings of every rank take part, as in the reference.
- :func:`l2_loss`: the reference's generation loss, the per-token Euclidean distance (not the squared error).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F

IGNORE_INDEX = -100  # label value that takes no part in a cross-entropy (torch's and the reference's default)


def caption_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of a batch.

    logits: ``[B, T, V]`` any float dtype; position ``t`` predicts the token at ``t + 1``.
    labels: ``[B, T]`` int64 token ids, :data:`IGNORE_INDEX` where no loss is taken (image prefix, padding, ...).
    Returns a float32 scalar, the mean over all labelled tokens of the batch (each token counts once, as the
    reference's Hugging Face loss); 0 when no token is labelled, rather than NaN.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    predictions = logits[:, :-1].float()  # fp32: a bf16 log-softmax over 50k classes loses the small probabilities
    targets = labels[:, 1:]
    total = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def gather_with_local_grad(local: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[N, ...]`` tensors concatenated in rank order, ``[world * N, ...]``; identity without a group.

    Only this rank's slice carries gradient; the others are constants. Each rank computes the same global loss,
    so rank ``r`` back-propagates exactly ``d loss / d local_r`` and DDP's gradient averaging then gives
    ``(1 / world) * d loss / d params``, which is the reference's gradient. (The autograd-aware
    ``torch.distributed.nn.functional.all_gather`` would add a reduce-scatter to every backward and return the
    full gradient, ``world`` times larger, changing the effective learning rate of the paper's recipe.)
    Every rank must pass the same shape: ``all_gather`` needs equal shards, so the loader drops the last partial
    batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, local.detach().contiguous())
    shards[dist.get_rank()] = local  # the only slice with a gradient path back to this rank's parameters
    return torch.cat(shards)


def info_nce(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor, logit_scale: torch.Tensor,
             gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between matching text and image embeddings (row ``i`` of one matches row ``i`` of the other).

    text_embeddings, image_embeddings: ``[N, E]`` L2-normalised (any float dtype; computed in float32).
    logit_scale: ``[]`` the learnable log-temperature; similarities are multiplied by ``exp(logit_scale)``.
    gather: under an initialised ``torch.distributed`` group, contrast against every rank's embeddings
        (see :func:`gather_with_local_grad`); the labels are then the global row indices.
    Returns a float32 scalar: the mean of the cross-entropies over ``logits_per_text`` and ``logits_per_image``.
    """
    if text_embeddings.shape != image_embeddings.shape or text_embeddings.ndim != 2:
        raise ValueError(f"expected two [N, E] embeddings of one shape, got {tuple(text_embeddings.shape)} "
                         f"and {tuple(image_embeddings.shape)}")
    text, image = text_embeddings.float(), image_embeddings.float()
    if gather:
        text, image = gather_with_local_grad(text), gather_with_local_grad(image)
    logits_per_image = logit_scale.float().exp() * image @ text.T  # [N, N]; row = image, column = text
    targets = torch.arange(text.shape[0], device=text.device)
    return (F.cross_entropy(logits_per_image.T, targets) + F.cross_entropy(logits_per_image, targets)) / 2


def l2_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generation loss: Euclidean distance per token, averaged over tokens and batch.

    prediction, target: ``[B, 77, E]`` (E = 768 for Stable Diffusion v1.5); computed in float32.
    Returns a float32 scalar ``mean_{b, t} sqrt(sum_e (prediction - target)^2)``. This is the reference's
    ``l2_loss``; it is not the squared error (MSE) the paper describes. ``vector_norm`` is used rather than
    ``sqrt(sum(...))`` because its gradient at a zero distance is 0 where ``sqrt``'s is NaN.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return torch.linalg.vector_norm(prediction.float() - target.float(), dim=-1).mean()
