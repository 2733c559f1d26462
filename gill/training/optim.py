"""Optimiser, learning-rate schedule and gradient clipping for GILL's adapters (the reference's defaults).

Weight decay applies to exactly the 2-D parameters: every weight matrix of the adapters (linear layers, the
mapper's attention projections) and the ``[IMG]`` embedding rows. Nothing else decays: biases, LayerNorm gains,
``logit_scale`` (a temperature, which decay would pull towards 1) and the mapper's ``query_embs`` (``[1, 77, h]``
learned queries, embeddings like a positional table). The reference decays every tensor, the frozen LM rows
included; the frozen models here have no trainable parameters at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gill.errors import InputError


def decay_parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """``module``'s trainable parameters as two AdamW groups: 2-D tensors with ``weight_decay``, the rest with 0.

    Each group also records its parameters' names under ``param_names``, for logs and tests.
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim == 2 else no_decay).append((name, parameter))
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def make_optimizer(objective: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                   weight_decay: float = 0.01, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``objective``'s trainable parameters (the reference's lr 1e-3, betas (0.9, 0.95), wd 0.01).

    Uses the fused CUDA kernel when every parameter is on a CUDA device (one launch per step instead of
    several per tensor); elsewhere torch's default implementation.
    """
    groups = decay_parameter_groups(objective, weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    if not parameters:
        raise InputError("the objective has no trainable parameters")
    fused = all(p.is_cuda for p in parameters) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused)


@dataclass(frozen=True)
class WarmupStepDecay:
    """The reference's learning-rate factor at optimiser step ``t`` (0-based, steps already taken).

    Linear warm-up ``(t + 1) / warmup_steps`` for ``t < warmup_steps``, then ``gamma ** ((t - warmup_steps) //
    step_size)``: the first decay comes ``step_size`` steps after warm-up ends, as the reference's
    ``GradualWarmupScheduler`` hands over to a fresh ``StepLR`` then. The warm-up starts at ``1 / warmup_steps``
    rather than the reference's 0, whose first step is wasted. A dataclass rather than a lambda, so that
    ``LambdaLR.state_dict()`` records its settings.
    """

    warmup_steps: int
    step_size: int
    gamma: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.gamma ** ((step - self.warmup_steps) // self.step_size)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 2000, step_size: int = 10000,
                   gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (call ``scheduler.step()`` after each ``optimizer.step()``): :class:`WarmupStepDecay`.

    Defaults are the reference's: 2000 warm-up steps, x0.1 every 5 epochs of 2000 steps. Resume with
    ``scheduler.load_state_dict`` on a scheduler made with the same arguments.
    """
    if warmup_steps < 0 or step_size <= 0 or not 0 < gamma <= 1:
        raise InputError(f"need warmup_steps >= 0, step_size > 0 and 0 < gamma <= 1; got {warmup_steps}, "
                         f"{step_size}, {gamma}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepDecay(warmup_steps, step_size, gamma))


def clip_gradients(objective: nn.Module, max_norm: float = 1.0) -> torch.Tensor:
    """Clip the trainable parameters' gradients to a total L2 norm of ``max_norm`` (the reference's 1.0).

    Returns the total norm before clipping (a float32 scalar tensor), for the logs; a non-finite norm is
    returned, not raised, so the caller can skip the step and count it.
    """
    parameters = [p for p in objective.parameters() if p.requires_grad and p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
