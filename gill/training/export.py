"""Turn a training objective into a serving checkpoint directory that ``gill run`` and ``gill serve`` load.

:func:`export_checkpoint` writes, into ``out``::

    model_args.json               the base checkpoint's, with relative base-model sources (lm/, clip/, sd/, a
                                  tokenizer folder) rewritten to absolute paths into the base checkpoint
    gill_adapters.safetensors     the trained adapters (float32, official keys)
    decision_model.safetensors    the base checkpoint's head, copied when it has one (retrain it: see below)
    retrieval_embeddings.npz      the base corpus re-embedded with the new visual_fc, when its images are local
    retrieval_captions.json       its captions, keyed like the npz's urls
    training.json                 what produced the export (the caller's ``training_info``)
    SHA256SUMS                    every file above (gill.integrity)

The base models are not copied: the export refers to them, so the base checkpoint must stay where it is.
A corpus whose images are URLs cannot be re-embedded offline: its vectors came from the old ``visual_fc``, so it is
dropped with a warning (embed its images with the new weights, as the reference's ``scripts/extract_img_embs.py``
does, write ``retrieval_embeddings.npz`` and ``gill ingest`` it). The decision head was trained on the base LM's
``[IMG0]`` states, which the new ``[IMG]`` rows change: ``gill train-decision EXPORT ANNOTATIONS`` retrains it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gill.config import GILLArgs
from gill.convert import DECISION_FILE, EMBEDDINGS_FILE
from gill.errors import CheckpointError
from gill.retrieval import CAPTIONS_FILE
from gill.training.objective import GILLObjective

logger = logging.getLogger(__name__)

SOURCE_FIELDS = ("opt_version", "visual_encoder", "sd_version", "tokenizer")
TRAINING_INFO_FILE = "training.json"
EMBED_BATCH = 64  # corpus images per CLIP forward while re-embedding


def absolute_sources(args: GILLArgs, base_dir: Path) -> GILLArgs:
    """``args`` with each base-model source that is a path relative to ``base_dir`` made absolute (hub ids and
    absolute paths unchanged), so a checkpoint written elsewhere still finds ``lm/``, ``clip/`` and ``sd/``."""
    changes = {}
    for name in SOURCE_FIELDS:
        value = getattr(args, name)
        if value and not Path(value).is_absolute() and (base_dir / value).exists():
            changes[name] = str((base_dir / value).resolve())
    return replace(args, **changes)


def _local_image(url: str, base_dir: Path) -> Path | None:
    """Where a corpus entry's image is on disk, or None for a URL."""
    if "://" in url:
        return None
    path = Path(url)
    return path if path.is_absolute() else (base_dir / path).resolve()


@torch.no_grad()
def _embed_images(objective: GILLObjective, paths: list[Path], image_processor: Any) -> np.ndarray:
    """``[N, ret_emb_dim]`` float32 raw (not normalised) ``visual_fc`` outputs, as the official corpus file stores."""
    from gill.images import load_image

    rows = []
    with torch.autocast(objective.device.type, dtype=torch.bfloat16, enabled=objective.uses_autocast):
        for start in range(0, len(paths), EMBED_BATCH):
            images = [load_image(path, what=str(path)) for path in paths[start:start + EMBED_BATCH]]
            pixels = image_processor(images=images, return_tensors="pt").pixel_values
            pooled = objective.encode_images(pixels)
            rows.append(objective.adapters.visual_fc(pooled).float().cpu())
    return torch.cat(rows).numpy()


def _export_corpus(objective: GILLObjective, base_dir: Path, out: Path, image_processor: Any) -> int:
    """Re-embed the base corpus into ``out``; returns the number of entries written (0: none, with a warning)."""
    source = base_dir / EMBEDDINGS_FILE
    if not source.is_file():
        return 0
    with np.load(source, allow_pickle=False) as data:
        urls = [str(url) for url in data["urls"]]
    paths = [_local_image(url, base_dir) for url in urls]
    remote = sum(path is None for path in paths)
    missing = [path for path in paths if path is not None and not path.is_file()]
    if remote or missing:
        reason = (f"{remote} of its {len(urls)} images are URLs" if remote else
                  f"{len(missing)} of its images are missing, first {missing[0]}")
        logger.warning("the retrieval corpus of %s is not exported: %s, and its vectors were made with the old "
                       "visual_fc. Embed the images with the new weights, write %s and `gill ingest` it.",
                       base_dir, reason, EMBEDDINGS_FILE)
        return 0
    local_paths = [path for path in paths if path is not None]
    embeddings = _embed_images(objective, local_paths, image_processor)
    new_urls = [str(path) for path in local_paths]  # absolute: the export's image store resolves them as they are
    np.savez(out / EMBEDDINGS_FILE, embeddings=embeddings, urls=np.array(new_urls, dtype=np.str_))
    captions_path = base_dir / CAPTIONS_FILE
    if captions_path.is_file():
        captions = json.loads(captions_path.read_text())
        renamed = {new: captions[old] for old, new in zip(urls, new_urls, strict=True) if old in captions}
        (out / CAPTIONS_FILE).write_text(json.dumps(renamed, indent=1))
    return len(new_urls)


def _replace_directory(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` to ``out``, replacing an older export."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(objective: GILLObjective, base_dir: str | Path, out: str | Path,
                      training_info: dict[str, Any] | None = None) -> Path:
    """Write a serving checkpoint of ``objective``'s adapters on ``base_dir``'s base models into ``out``.

    See the module docstring for the files. ``out`` is assembled in a hidden sibling folder and then moved into
    place, so a crash leaves the previous export whole. ``objective`` is the unwrapped module (not DDP's wrapper).
    Returns ``out``.
    """
    from transformers import AutoImageProcessor

    from gill.config import resolve_source
    from gill.integrity import write_checksums

    base_dir, out = Path(base_dir).resolve(), Path(out)
    if out.resolve() == base_dir:
        raise CheckpointError(f"{out}: the export would overwrite the base checkpoint; choose another folder")
    args = GILLArgs.load(base_dir)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        absolute_sources(args, base_dir).save(partial)
        objective.save_adapters(partial)
        if (base_dir / DECISION_FILE).is_file():
            shutil.copyfile(base_dir / DECISION_FILE, partial / DECISION_FILE)
            logger.warning("%s: copied the base checkpoint's decision head, which was trained for the old [IMG] "
                           "rows; retrain it for this model with `gill train-decision %s ANNOTATIONS`",
                           out / DECISION_FILE, out)
        processor = AutoImageProcessor.from_pretrained(resolve_source(args.visual_encoder, base_dir))
        corpus = _export_corpus(objective, base_dir, partial, processor)
        info = {"base_checkpoint": str(base_dir), "retrieval_corpus_entries": corpus, **(training_info or {})}
        (partial / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        write_checksums(partial)
        _replace_directory(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def copy_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Copy an exported checkpoint ``source`` to ``out``, replacing it as :func:`export_checkpoint` does (the
    trainer's ``best/``: a copy, so a local corpus is not embedded twice). Returns ``out``."""
    source, out = Path(source), Path(out)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        # Hidden files are per-directory bookkeeping (the integrity records name inodes), not checkpoint content.
        shutil.copytree(source, partial, ignore=lambda _, names: [n for n in names if n.startswith(".")])
        _replace_directory(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
