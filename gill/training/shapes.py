"""A synthetic caption-image dataset, offline and deterministic: coloured shapes with captions that describe them.

Each image is :func:`gill.tiny.shape_image` (a ``colour`` ``shape`` centred on a ``background``) and its caption says
exactly that, "a red circle on a blue background", so a model trained on it can be checked by eye. The layout is
the one the training data loaders read::

    out_dir/train.tsv, out_dir/val.tsv       columns caption, image (image paths relative to out_dir)
    out_dir/images/train-000000.png ...
    out_dir/shards/train-000000.tar ...      with shards=True: webdataset shards, key train-000000 (.png + .txt)

Usage::

    gill.training.shapes.make_shapes_dataset("/tmp/shapes", n_train=512, n_val=64, image_size=32, seed=0)
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from gill.errors import InputError
from gill.tiny import COLOURS, SHAPES, shape_image


@dataclass(frozen=True)
class ShapesDataset:
    """Where :func:`make_shapes_dataset` wrote each part (``image_dir`` is what the TSV paths are relative to)."""

    root: Path
    train_tsv: Path
    val_tsv: Path
    image_dir: Path
    train_shards: tuple[Path, ...]
    val_shards: tuple[Path, ...]

    def shard_pattern(self, split: str) -> str:
        """The brace pattern of a split's shards, e.g. ``.../shards/train-{000000..000003}.tar``."""
        shards = self.train_shards if split == "train" else self.val_shards
        if not shards:
            raise InputError(f"no {split} shards were written; call make_shapes_dataset(..., shards=True)")
        return str(self.root / "shards" / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar")


def _draw_caption(rng: random.Random) -> tuple[str, str, str]:
    colour, background = rng.sample(list(COLOURS), 2)  # two distinct colours, so the shape is visible
    return colour, rng.choice(SHAPES), background


def _png_bytes(colour: str, shape: str, background: str, size: int) -> bytes:
    buffer = io.BytesIO()
    shape_image(colour, shape, background, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(root: Path, split: str, count: int, size: int, rng: random.Random, shards: bool,
                 samples_per_shard: int) -> tuple[Path, tuple[Path, ...]]:
    """Images, the TSV and (optionally) the shards of one split; returns the TSV path and the shard paths."""
    rows, samples = [], []
    for index in range(count):
        colour, shape, background = _draw_caption(rng)
        key = f"{split}-{index:06d}"
        caption = f"a {colour} {shape} on a {background} background"
        png = _png_bytes(colour, shape, background, size)
        (root / "images" / f"{key}.png").write_bytes(png)
        rows.append((caption, f"images/{key}.png"))
        samples.append({"__key__": key, "png": png, "txt": caption})
    tsv = root / f"{split}.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(("caption", "image"))
        writer.writerows(rows)
    shard_paths: list[Path] = []
    if shards:
        from webdataset import TarWriter

        (root / "shards").mkdir(exist_ok=True)
        for number, begin in enumerate(range(0, count, samples_per_shard)):
            path = root / "shards" / f"{split}-{number:06d}.tar"
            with TarWriter(str(path), mtime=0) as writer:  # fixed mtime: same seed, same bytes
                for sample in samples[begin:begin + samples_per_shard]:
                    writer.write(sample)
            shard_paths.append(path)
    return tsv, tuple(shard_paths)


def make_shapes_dataset(out_dir: str | Path, n_train: int, n_val: int, image_size: int = 32, seed: int = 0,
                        shards: bool = False, samples_per_shard: int = 100) -> ShapesDataset:
    """Write ``n_train`` + ``n_val`` RGB ``image_size``-pixel PNGs with captions; the same seed gives the same bytes.

    ``shards=True`` also packs each split into webdataset tars of ``samples_per_shard`` samples, in TSV row order.
    """
    problems = []
    if n_train < 1 or n_val < 0:
        problems.append(f"need n_train >= 1 and n_val >= 0, got {n_train} and {n_val}")
    if image_size < 8:
        problems.append(f"image_size must be at least 8 pixels for the shape to show, got {image_size}")
    if samples_per_shard < 1:
        problems.append(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if problems:
        raise InputError("; ".join(problems))
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_tsv, train_shards = _write_split(root, "train", n_train, image_size, rng, shards, samples_per_shard)
    val_tsv, val_shards = _write_split(root, "val", n_val, image_size, rng, shards, samples_per_shard)
    return ShapesDataset(root, train_tsv, val_tsv, root, train_shards, val_shards)
