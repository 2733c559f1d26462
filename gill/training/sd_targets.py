"""Precompute the generation loss's targets: Stable Diffusion's text-encoder states of every caption.

GILL's mapper learns to output what SD's CLIP text encoder gives for the caption (``last_hidden_state``,
``[77, gen_emb_dim]``), so the reference computes those once (``scripts/preprocess_sd_embeddings.py``) and
stores one float16 ``.npy`` per sample. Here the file of sample ``key`` is ``data.target_path(out_dir, key)``,
the same function the datasets read with.

The run is resumable: a file that is already complete (right header, shape, dtype and size) is skipped, and each
file is written to a temporary name and renamed, so an interrupted run leaves whole files or none. A killed run
may leave ``*.tmp`` files behind; they are never read and can be deleted.

Usage::

    counts = preprocess_sd_targets("datasets/cc3m_train.tsv", "checkpoints/gill_opt", "data/cc3m/clip_embs",
                                   batch_size=256, device="cuda")
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gill.config import GILLArgs, resolve_source
from gill.errors import CheckpointError, InputError
from gill.training.data import (
    Failed,
    SampleError,
    expand_shards,
    is_tsv,
    normalise_caption,
    read_tsv,
    shard_captions,
    target_file_ok,
    target_path,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetCounts:
    """What a run did: files ``written``, complete files ``skipped_existing``, and captions ``failed`` (empty or
    undecodable caption, duplicate key, unreadable shard)."""

    written: int
    skipped_existing: int
    failed: int


class SDTextEncoder:
    """The checkpoint's SD tokenizer and CLIP text encoder, used exactly as the SD pipeline encodes a prompt."""

    def __init__(self, checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        args = GILLArgs.load(checkpoint_dir)
        source = resolve_source(args.sd_version, checkpoint_dir)
        self.device = torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        self.model = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").to(self.device).eval()
        self.shape = (args.num_clip_tokens, args.gen_emb_dim)
        if self.model.config.hidden_size != args.gen_emb_dim:
            raise CheckpointError(f"{source}: the SD text encoder is {self.model.config.hidden_size} wide but "
                                  f"model_args.json says gen_emb_dim={args.gen_emb_dim}; they must match")

    @torch.inference_mode()
    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """``[N, 77, gen_emb_dim]`` float16: captions padded and truncated to 77 tokens, as SD does."""
        inputs = self.tokenizer(list(captions), padding="max_length", max_length=self.shape[0], truncation=True,
                                return_tensors="pt")
        # The SD pipeline passes the attention mask only to encoders configured for it (v1.5's is not).
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        mask = inputs.attention_mask.to(self.device) if use_mask else None
        states = self.model(input_ids=inputs.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return states.float().cpu().numpy().astype(np.float16)


def write_atomic(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` at ``path`` through a temporary file and a rename: the file is whole or absent."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, array)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


_Captions = Iterator[tuple[str, str | bytes | None] | Failed]


def _captions(source: str | Path | Sequence[str | Path]) -> tuple[_Captions, int | None]:
    """``(key, raw caption)`` pairs of a TSV or of shards (captions only, no image is read), and their count if
    known."""
    if isinstance(source, str | Path) and is_tsv(source):
        images, captions = read_tsv(source)
        return iter(zip(images, captions, strict=True)), len(images)
    return shard_captions(expand_shards(source)), None


def preprocess_sd_targets(source: str | Path | Sequence[str | Path], checkpoint_dir: str | Path,
                          out_dir: str | Path, batch_size: int = 64, device: str | torch.device = "cpu",
                          progress: bool = True) -> TargetCounts:
    """Write ``target_path(out_dir, key)``, a ``[77, gen_emb_dim]`` float16 ``.npy``, for every caption of ``source``.

    ``source`` is a CC3M-format TSV (keys are its ``image`` column, as :class:`~gill.training.data.CaptionImageTSV`
    uses) or webdataset shards as a list or brace pattern (keys are the samples' ``__key__``). No image directory
    is needed: only captions are read. Complete files from an earlier run are kept; missing, truncated or corrupt
    ones are (re)written. A sample whose caption is empty, or whose key repeats an earlier one, is counted as
    failed and gets no file.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = SDTextEncoder(checkpoint_dir, device)
    pairs, total = _captions(source)
    written = skipped = failed = 0
    seen: set[str] = set()
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        nonlocal written
        for (key, _), states in zip(pending, encoder([caption for _, caption in pending]), strict=True):
            write_atomic(target_path(out_dir, key), states)
            written += 1
        pending.clear()

    for entry in tqdm(pairs, total=total, unit="caption", desc="SD targets", disable=not progress):
        if isinstance(entry, Failed):
            failed += 1
            logger.warning("no SD targets for the rest of %s: %s", entry.key, entry.detail)
            continue
        key, raw = entry
        if not key:
            failed += 1
            logger.warning("a row without an image path gets no SD target")
            continue
        if key in seen:
            failed += 1
            logger.warning("duplicate key %s: its SD target would overwrite the first one's; skipped", key)
            continue
        seen.add(key)
        try:
            caption = normalise_caption(raw)
        except SampleError as error:
            failed += 1
            logger.debug("no SD target for %s: %s", key, error)
            continue
        if target_file_ok(target_path(out_dir, key), encoder.shape):
            skipped += 1
            continue
        pending.append((key, caption))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    counts = TargetCounts(written, skipped, failed)
    logger.info("SD targets in %s: %s", out_dir, counts)
    return counts
