"""The contract between the data pipeline and the training objective: one collated batch.

The reference tokenises every caption as ``caption + [IMG0..7]`` (BOS ``</s>`` first, ``max_len`` 32, right
padding) and, when the caption is truncated, forces the last 8 ids to the ``[IMG]`` ids. The objective derives its
three views (captioning, ``[IMG]`` prediction, generation) from these ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """``B`` samples that decoded and preprocessed cleanly (failed ones never reach a batch).

    pixel_values: ``[B, 3, H, W]`` float32, CLIP-normalised as the vision tower's image processor gives them.
    input_ids: ``[B, L]`` int64, BOS + caption tokens + ``[IMG0..7]``, right-padded with the pad id.
    attention_mask: ``[B, L]`` int64, 1 on real tokens (the ``[IMG]`` tokens included), 0 on padding.
    sd_targets: ``[B, 77, gen_emb_dim]`` float32 Stable Diffusion text-encoder states of the caption, or None
        when the dataset has no precomputed targets (the generation loss is then skipped).
    keys: ``B`` sample ids (the image path or shard key), for logs and the skipped-sample report.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sd_targets: torch.Tensor | None
    keys: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        targets = None if self.sd_targets is None else self.sd_targets.to(device, non_blocking=True)
        return Batch(self.pixel_values.to(device, non_blocking=True), self.input_ids.to(device, non_blocking=True),
                     self.attention_mask.to(device, non_blocking=True), targets, self.keys)
