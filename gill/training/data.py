"""Caption-image pairs for training: a CC3M-format TSV or webdataset shards -> :class:`~gill.training.batch.Batch`.

Two sources, one sample format:

- **TSV** (the reference's CC3M layout): a header row with columns ``caption`` and ``image``; ``image`` is a path
  relative to an image directory (by default the TSV's own folder). Random access, so resuming is exact.
- **webdataset shards**: tar files in which a sample is an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a
  ``.txt`` caption under one key, optionally with a ``.npy`` Stable Diffusion target. Given as a list of paths or
  a brace pattern (``shards/train-{000000..000099}.tar``). Sequential, read with the ``webdataset`` package.

A sample that cannot be used (missing or corrupt image, empty caption, missing or malformed target, unreadable
shard) becomes a :class:`Failed` marker instead of being replaced by another sample as the reference did. The
loader drops it from its batch and counts it by reason in :class:`SkipCounter`, in the main process, whatever the
number of DataLoader workers.

Usage::

    encoder = SampleEncoder.from_checkpoint("checkpoints/gill_opt")
    dataset = open_dataset("datasets/cc3m_train.tsv", encoder, image_dir="data/cc3m/training",
                           targets_dir="data/cc3m/clip_embs")
    loader = make_loader(dataset, batch_size=100, seed=0, num_workers=4, rank=rank, world_size=world_size,
                         start=DataPosition.from_dict(saved) if saved else DataPosition())
    for batch in loader.forever():
        if batch is None:  # every sample of this batch failed; the skips are already counted
            continue
        ...  # train; then save loader.position.to_dict() with the checkpoint, and log loader.skips
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import random
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from gill.config import GILLArgs, resolve_source
from gill.errors import InputError
from gill.tokens import SpecialTokens, load_tokenizer
from gill.training.batch import Batch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TSV_COLUMNS = ("caption", "image")

# Why a sample was skipped: the keys of SkipCounter.by_reason.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION = "bad_caption"
MISSING_TARGET = "missing_target"
BAD_TARGET = "bad_target"
UNREADABLE_SHARD = "unreadable_shard"


# ----------------------------------------------------------------------------------------------------------------
# Samples, failures and the skip counter


@dataclass(frozen=True)
class Failed:
    """A sample that could not be used. ``key`` names it (image path, shard key or shard URL), ``reason`` is one of
    the module's reason constants, ``detail`` says what went wrong."""

    key: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Sample:
    """One preprocessed pair.

    pixel_values: ``[3, H, W]`` float32, CLIP-normalised by the vision tower's image processor.
    input_ids: ``[max_len]`` int64, BOS + caption + ``[IMG0..7]``, right-padded with the pad id.
    attention_mask: ``[max_len]`` int64, 1 on real tokens (``[IMG]`` included), 0 on padding.
    sd_target: ``[77, gen_emb_dim]`` float16 SD text-encoder states of the caption, or None without targets.
    """

    key: str
    caption: str
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sd_target: torch.Tensor | None


class SampleError(Exception):
    """Raised while preparing a sample; the datasets turn it into :class:`Failed`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Skipped samples by reason, kept in the trainer's process.

    ``total`` is the number skipped so far, ``by_reason`` a ``Counter`` such as ``{"unreadable_image": 3}``;
    ``str(counter)`` is a one-line summary for logs. Each skip is logged at debug level with its key.
    """

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, failures: Iterable[Failed]) -> None:
        for failed in failures:
            self.by_reason[failed.reason] += 1
            logger.debug("skipped sample %s: %s (%s)", failed.key, failed.reason, failed.detail)

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.by_reason.items()))
        return f"{self.total} samples skipped" + (f" ({reasons})" if reasons else "")


# ----------------------------------------------------------------------------------------------------------------
# Captions, tokens, images and Stable Diffusion targets


def normalise_caption(raw: str | bytes | None) -> str:
    """The caption without surrounding whitespace; raises :class:`SampleError` when it is missing or empty."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SampleError(BAD_CAPTION, f"caption is not UTF-8 ({error})") from error
    caption = (raw or "").strip()
    if not caption:
        raise SampleError(EMPTY_CAPTION, "caption is missing or empty")
    return caption


def tokenize_caption(caption: str, tokenizer: PreTrainedTokenizerBase, img_ids: Sequence[int], pad_id: int,
                     max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as the reference trains on them: BOS, the caption, then the ``[IMG]`` ids, right-padded.

    A caption too long for ``max_len`` is cut so that the ``[IMG]`` ids still end the sequence (the reference
    truncates and then overwrites the last ``len(img_ids)`` ids). Returns ``input_ids`` and ``attention_mask``,
    both ``[max_len]`` int64; the mask is 1 on BOS, caption and ``[IMG]`` tokens and 0 on padding.
    """
    if max_len <= len(img_ids) + 1:
        raise InputError(f"max_len={max_len} leaves no room for a caption token beside BOS and "
                         f"{len(img_ids)} [IMG] tokens; use more than {len(img_ids) + 1} (the reference uses 32)")
    caption_ids = tokenizer(caption, add_special_tokens=True).input_ids  # BOS (</s> for OPT) first
    ids = list(caption_ids[: max_len - len(img_ids)]) + list(img_ids)
    padding = max_len - len(ids)
    input_ids = torch.tensor(ids + [pad_id] * padding, dtype=torch.int64)
    attention_mask = torch.tensor([1] * len(ids) + [0] * padding, dtype=torch.int64)
    return input_ids, attention_mask


def open_rgb(source: Path | bytes) -> Image.Image:
    """Decode an image file or its bytes to RGB; raises :class:`SampleError` when it is missing or corrupt."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            return image.convert("RGB")  # converting decodes every pixel, so a truncated file fails here
    except FileNotFoundError as error:
        raise SampleError(MISSING_IMAGE, f"no image at {error.filename}") from error
    except Exception as error:  # PIL raises many types for broken web images; each is one bad sample
        raise SampleError(UNREADABLE_IMAGE, f"{type(error).__name__}: {error}") from error


def target_path(targets_dir: str | Path, key: str) -> Path:
    """Where the SD target of sample ``key`` lives: ``targets_dir/<key, percent-encoded>.npy``.

    Percent-encoding every character but letters, digits and ``_.-~`` keeps the folder flat, makes distinct keys
    distinct files, and lets no key (``../x``, ``/abs``) escape ``targets_dir``. A key whose encoding is too long
    for a file name is named by its SHA-256 instead, after ``%sha256-``, which no encoded key can start with.
    """
    name = urllib.parse.quote(key, safe="")
    if len(name) > 200:
        name = "%sha256-" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return Path(targets_dir) / f"{name}.npy"


def read_target(source: Path | bytes, shape: tuple[int, int]) -> torch.Tensor:
    """Load one SD target, ``shape`` (``[77, gen_emb_dim]``) float16; raises :class:`SampleError` when it is
    missing, not a plain ``.npy`` array, of another shape, or not finite."""
    try:
        array = np.load(source if isinstance(source, Path) else io.BytesIO(source), allow_pickle=False)
    except FileNotFoundError as error:
        raise SampleError(MISSING_TARGET, f"no SD target at {error.filename}; run preprocess_sd_targets") from error
    except (OSError, ValueError, EOFError) as error:
        raise SampleError(BAD_TARGET, f"not a .npy array ({error})") from error
    if array.shape != tuple(shape) or not np.issubdtype(array.dtype, np.floating):
        raise SampleError(BAD_TARGET, f"SD target is {array.dtype} {list(array.shape)}; the checkpoint needs "
                                      f"float {list(shape)}: recompute it with this checkpoint's text encoder")
    if not np.isfinite(array).all():
        raise SampleError(BAD_TARGET, "SD target holds NaN or infinity")
    return torch.from_numpy(array.astype(np.float16))


def target_file_ok(path: Path, shape: tuple[int, int]) -> bool:
    """True when ``path`` is a complete float16 ``.npy`` of ``shape``; reads the header and the file size only, so
    that checking millions of finished targets on resume stays cheap."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            reader = readers.get(np.lib.format.read_magic(handle))
            if reader is None:
                return False
            file_shape, _, dtype = reader(handle)
            expected_size = handle.tell() + int(np.prod(file_shape)) * dtype.itemsize
            size = path.stat().st_size
    except (OSError, ValueError):
        return False
    return file_shape == tuple(shape) and dtype == np.float16 and size == expected_size


class SampleEncoder:
    """Turns one (image, caption, optional SD target) into a :class:`Sample`; shared by both datasets.

    ``image_processor`` is the vision tower's (``AutoImageProcessor``), ``tokenizer`` and ``tokens`` come from
    :func:`gill.tokens.load_tokenizer`, ``target_shape`` is ``(num_clip_tokens, gen_emb_dim)``.
    """

    def __init__(self, image_processor: Any, tokenizer: PreTrainedTokenizerBase, tokens: SpecialTokens,
                 target_shape: tuple[int, int], max_len: int = 32) -> None:
        if max_len <= len(tokens.img) + 1:
            raise InputError(f"max_len={max_len} must exceed {len(tokens.img) + 1} (BOS and the [IMG] tokens)")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.target_shape = target_shape
        self.max_len = max_len

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, max_len: int = 32) -> SampleEncoder:
        """The tokenizer, ``[IMG]`` ids, image processor and target shape of a GILL checkpoint directory."""
        from transformers import AutoImageProcessor

        args = GILLArgs.load(checkpoint_dir)
        tokenizer, tokens = load_tokenizer(resolve_source(args.tokenizer or args.opt_version, checkpoint_dir),
                                           args.num_tokens)
        processor = AutoImageProcessor.from_pretrained(resolve_source(args.visual_encoder, checkpoint_dir))
        return cls(processor, tokenizer, tokens, (args.num_clip_tokens, args.gen_emb_dim), max_len)

    def tokenize(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, ``[max_len]`` int64 each (see :func:`tokenize_caption`)."""
        return tokenize_caption(caption, self.tokenizer, self.tokens.img, self.tokens.pad, self.max_len)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """``[3, H, W]`` float32 as the vision tower expects them."""
        return self.image_processor(images=image, return_tensors="pt").pixel_values[0].to(torch.float32)

    def encode(self, key: str, image: Path | bytes | None, caption: str | bytes | None,
               target: Path | bytes | None = None, with_target: bool = False) -> Sample | Failed:
        """A :class:`Sample`, or :class:`Failed` with the reason; the cheap checks run before the image decode."""
        try:
            text = normalise_caption(caption)
            sd_target = None
            if with_target:
                if target is None:
                    raise SampleError(MISSING_TARGET, "the sample has no .npy SD target and no targets folder is set")
                sd_target = read_target(target, self.target_shape)
            if image is None:
                raise SampleError(MISSING_IMAGE, f"no image file ({'/'.join(IMAGE_EXTENSIONS)}) in the sample")
            pixel_values = self.pixels(open_rgb(image))
        except SampleError as error:
            return Failed(key, error.reason, error.detail)
        input_ids, attention_mask = self.tokenize(text)
        return Sample(key, text, pixel_values, input_ids, attention_mask, sd_target)


# ----------------------------------------------------------------------------------------------------------------
# TSV data


class _StringTable:
    """Strings packed into one numpy buffer.

    DataLoader workers fork the dataset; a Python list of millions of strings would be copied into each worker as
    reference counts are touched, while a numpy buffer stays shared.
    """

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self._data[self._offsets[index]:self._offsets[index + 1]].tobytes().decode("utf-8")


def read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """The ``image`` and ``caption`` columns of a CC3M-format TSV, row by row (other columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such TSV file")
    images, captions = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [c for c in TSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: the header row lacks column(s) {missing}; a CC3M-format TSV is tab-separated "
                             f"with a header naming 'caption' and 'image' (found {reader.fieldnames})")
        for row in reader:
            images.append(row["image"] or "")
            captions.append(row["caption"] or "")
    if not images:
        raise InputError(f"{path}: the TSV has a header but no rows")
    return images, captions


class CaptionImageTSV(Dataset):
    """A CC3M-format TSV; item ``i`` is a :class:`Sample` or a :class:`Failed` marker, keyed by its ``image`` path.

    ``image_dir``: folder the ``image`` column is relative to (default: the TSV's folder). ``targets_dir``: folder
    of precomputed SD targets (:func:`target_path`); when set, every sample needs one.
    """

    def __init__(self, tsv_path: str | Path, encoder: SampleEncoder, image_dir: str | Path | None = None,
                 targets_dir: str | Path | None = None) -> None:
        images, captions = read_tsv(tsv_path)
        self.tsv_path = Path(tsv_path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.tsv_path.parent
        if not self.image_dir.is_dir():
            raise InputError(f"{self.image_dir}: image folder not found; pass the folder that the TSV's 'image' "
                             "paths are relative to")
        self.targets_dir = Path(targets_dir) if targets_dir is not None else None
        if self.targets_dir is not None and not self.targets_dir.is_dir():
            raise InputError(f"{self.targets_dir}: SD target folder not found; run preprocess_sd_targets first")
        self.encoder = encoder
        self._images = _StringTable(images)
        self._captions = _StringTable(captions)

    def __len__(self) -> int:
        return len(self._images)

    def key(self, index: int) -> str:
        return self._images[index] or f"<row {index + 1} of {self.tsv_path.name}: empty image>"

    def __getitem__(self, index: int) -> Sample | Failed:
        image = self._images[index]
        key = self.key(index)
        target = target_path(self.targets_dir, key) if self.targets_dir is not None else None
        return self.encoder.encode(key, self.image_dir / image if image else None, self._captions[index],
                                   target, with_target=self.targets_dir is not None)


# ----------------------------------------------------------------------------------------------------------------
# webdataset shards


def expand_shards(shards: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a list or a brace pattern (``train-{000000..000009}.tar``); local files must exist."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(str(shards)) if isinstance(shards, str | Path) else [str(s) for s in shards]
    if not urls:
        raise InputError("no shards given; pass a list of .tar paths or a brace pattern like "
                         "'shards/train-{000000..000009}.tar'")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(urls)} shards not found, first {missing[0]}; check the pattern")
    return urls


def read_shard(url: str, select_files: Any = None) -> Iterator[dict[str, Any] | Failed]:
    """The raw samples of one shard (``{"__key__": ..., "jpg": bytes, "txt": bytes, ...}``), in tar order.

    A tar that cannot be read to its end yields one :class:`Failed` for the shard; its remaining samples are lost.
    """
    from webdataset.tariterators import tarfile_samples

    try:
        yield from tarfile_samples([{"url": url}], select_files=select_files)
    except Exception as error:  # tarfile and gopen raise many types for a damaged shard
        message = error.args[0] if error.args else type(error).__name__
        yield Failed(url, UNREADABLE_SHARD, f"{type(error).__name__}: {message}")


def shard_captions(shards: Sequence[str]) -> Iterator[tuple[str, bytes | None] | Failed]:
    """``(key, raw caption)`` of every sample, reading only the ``.txt`` members (no image is decoded)."""
    for url in shards:
        for raw in read_shard(url, select_files=lambda name: name.lower().endswith(".txt")):
            yield raw if isinstance(raw, Failed) else (raw["__key__"], raw.get("txt"))


class CaptionImageShards(IterableDataset):
    """webdataset shards; iterating yields a :class:`Sample` or :class:`Failed` per sample, keyed by ``__key__``.

    Plain iteration reads every shard in order (split across DataLoader workers when there are any); training
    should go through :func:`make_loader`, which adds per-epoch shard shuffling, rank splitting and resume.
    Targets: with ``with_targets`` (implied by ``targets_dir``) every sample needs one, from its own ``.npy``
    member or else from ``target_path(targets_dir, key)``; without it any ``.npy`` member is ignored.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], encoder: SampleEncoder, *,
                 targets_dir: str | Path | None = None, with_targets: bool = False) -> None:
        self.shards = expand_shards(shards)
        self.encoder = encoder
        self.targets_dir = Path(targets_dir) if targets_dir is not None else None
        self.with_targets = with_targets or self.targets_dir is not None

    def __iter__(self) -> Iterator[Sample | Failed]:
        info = get_worker_info()
        shards = self.shards[info.id::info.num_workers] if info is not None else self.shards
        yield from self.stream(shards)

    def stream(self, shards: Sequence[str], skip: int = 0, shuffle_buffer: int = 0,
               rng: random.Random | None = None) -> Iterator[Sample | Failed]:
        """Samples of ``shards`` in order (or through a ``shuffle_buffer``-sample buffer drawn by ``rng``), after
        dropping the first ``skip`` stream entries undecoded. Entries are samples and unreadable-shard markers."""
        raw: Iterator[dict[str, Any] | Failed] = itertools.chain.from_iterable(read_shard(url) for url in shards)
        if shuffle_buffer > 1:
            from webdataset.filters import shuffle

            raw = shuffle(bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)(raw)
        for entry in itertools.islice(raw, skip, None):
            yield entry if isinstance(entry, Failed) else self.encode(entry)

    def encode(self, raw: dict[str, Any]) -> Sample | Failed:
        key = raw["__key__"]
        image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        target = raw.get("npy")
        if target is None and self.targets_dir is not None:
            target = target_path(self.targets_dir, key)
        return self.encoder.encode(key, image, raw.get("txt"), target, with_target=self.with_targets)


def is_tsv(source: str | Path | Sequence[str | Path]) -> bool:
    """True for a path ending in ``.tsv``; anything else is taken for shards."""
    return isinstance(source, str | Path) and str(source).lower().endswith(".tsv")


def open_dataset(source: str | Path | Sequence[str | Path], encoder: SampleEncoder, *,
                 image_dir: str | Path | None = None,
                 targets_dir: str | Path | None = None) -> CaptionImageTSV | CaptionImageShards:
    """A :class:`CaptionImageTSV` for a ``.tsv`` path, else :class:`CaptionImageShards` for a shard list or pattern."""
    if isinstance(source, str | Path) and is_tsv(source):
        return CaptionImageTSV(source, encoder, image_dir=image_dir, targets_dir=targets_dir)
    if image_dir is not None:
        raise InputError("image_dir applies to a TSV only; shards carry their images")
    return CaptionImageShards(source, encoder, targets_dir=targets_dir)


# ----------------------------------------------------------------------------------------------------------------
# Collation and the loader


def collate(samples: Sequence[Sample | Failed]) -> Batch | None:
    """Stack the samples that did not fail into a :class:`Batch`; None when every one failed.

    sd_targets is ``[B, 77, gen_emb_dim]`` float32 when the samples carry targets, else None.
    """
    good = [s for s in samples if isinstance(s, Sample)]
    if not good:
        return None
    targets = [s.sd_target for s in good if s.sd_target is not None]
    if targets and len(targets) != len(good):
        raise ValueError("a batch mixes samples with and without SD targets; a dataset gives targets to all or none")
    return Batch(
        pixel_values=torch.stack([s.pixel_values for s in good]),
        input_ids=torch.stack([s.input_ids for s in good]),
        attention_mask=torch.stack([s.attention_mask for s in good]),
        sd_targets=torch.stack(targets).to(torch.float32) if targets else None,
        keys=[s.key for s in good],
    )


class _Collated(NamedTuple):
    """What a DataLoader worker sends back: the batch, the failures to count, and which worker made it."""

    batch: Batch | None
    failures: list[Failed]
    worker: int


def _collate_in_worker(samples: Sequence[Sample | Failed]) -> _Collated:
    info = get_worker_info()
    return _Collated(collate(samples), [s for s in samples if isinstance(s, Failed)], info.id if info else 0)


@dataclass(frozen=True)
class DataPosition:
    """How far a run has read its data: ``epoch`` passes completed and ``batch`` batches of the current pass handed
    out. Save :meth:`to_dict` with each checkpoint and pass :meth:`from_dict` of it to :func:`make_loader`.

    For shards, ``worker_batches`` (batches each loader worker has yielded in this pass) and ``next_worker`` (whose
    batch comes next) make resuming exact although workers finish their shards at different times.
    """

    epoch: int = 0
    batch: int = 0
    worker_batches: tuple[int, ...] = field(default=())
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "worker_batches": list(self.worker_batches),
                "next_worker": self.next_worker}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(int(data["epoch"]), int(data["batch"]), tuple(int(n) for n in data.get("worker_batches", ())),
                   int(data.get("next_worker", 0)))


class TrainLoader:
    """Batches for one rank, pass after pass, from a saved :class:`DataPosition`; build it with :func:`make_loader`.

    ``iter(loader)`` yields the rest of the current pass and then moves ``position`` to the next epoch;
    :meth:`forever` chains passes. Each item is a :class:`Batch`, or None when all its samples failed.
    ``position`` counts the batches handed out (None ones included); ``skips`` counts the failed samples.
    """

    def __init__(self, dataset: CaptionImageTSV | CaptionImageShards, batch_size: int, *, seed: int, shuffle: bool,
                 drop_last: bool, num_workers: int, rank: int, world_size: int, start: DataPosition,
                 shuffle_buffer: int, skips: SkipCounter, group_size: int = 1) -> None:
        self.dataset = dataset
        self.group_size = group_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.position = start
        self.shuffle_buffer = shuffle_buffer
        self.skips = skips

    @property
    def _logical_workers(self) -> int:
        return max(self.num_workers, 1)

    def __len__(self) -> int:
        """Batches in one full pass on this rank (TSV only: shards do not know their length)."""
        if not isinstance(self.dataset, CaptionImageTSV):
            raise TypeError("a shard loader does not know its length; count steps instead")
        # Whole groups per rank (entries when group_size is 1, as DistributedSampler(drop_last=True) deals them).
        per_rank = len(self.dataset) // self.group_size // self.world_size * self.group_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[Batch | None]:
        if isinstance(self.dataset, CaptionImageTSV):
            yield from self._tsv_pass()
        else:
            yield from self._shard_pass()
        self.position = DataPosition(self.position.epoch + 1, 0)

    def _tsv_pass(self) -> Iterator[Batch | None]:
        for collated in self._tsv_loader():
            self.skips.record(collated.failures)
            self.position = DataPosition(self.position.epoch, self.position.batch + 1)
            yield collated.batch

    def _shard_pass(self) -> Iterator[Batch | None]:
        workers = self._logical_workers
        worker_batches, rotation = self._resume_counts()
        counts = list(worker_batches)
        for collated in self._shard_loader(worker_batches, rotation):
            self.skips.record(collated.failures)
            # Loader worker i plays logical worker (i + rotation) % workers; see _resume_counts.
            logical = (collated.worker + rotation) % workers
            counts[logical] += 1
            self.position = DataPosition(self.position.epoch, self.position.batch + 1, tuple(counts),
                                         (logical + 1) % workers)
            yield collated.batch

    def forever(self) -> Iterator[Batch | None]:
        """Pass after pass without end; raises :class:`InputError` if a whole pass yields no batch."""
        while True:
            from_start = self.position.batch == 0
            yielded = False
            for batch in self:
                yielded = yielded or batch is not None  # a batch whose every sample failed is None
                yield batch
            if from_start and not yielded:
                raise InputError(f"a whole pass over the data gave rank {self.rank} no batch of {self.batch_size} "
                                 f"({self.skips}); fix the data (for missing SD targets run "
                                 "preprocess_sd_targets), or use a smaller batch size or more data")

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _tsv_indices(self) -> list[int]:
        """This rank's dataset indices for the current pass: groups of ``group_size`` consecutive entries permuted
        by (seed, epoch) and dealt to the ranks in turn, the last ``groups % world_size`` dropped. With
        ``group_size`` 1 this is exactly ``DistributedSampler(shuffle, seed, drop_last=True)`` at that epoch."""
        size, groups = self.group_size, len(self.dataset) // self.group_size
        if self.shuffle:
            order = torch.randperm(groups, generator=torch.Generator().manual_seed(self.seed + self.position.epoch))
        else:
            order = torch.arange(groups)
        kept = order[:groups - groups % self.world_size][self.rank::self.world_size].tolist()
        return [group * size + offset for group in kept for offset in range(size)]

    def _tsv_loader(self) -> DataLoader:
        indices = self._tsv_indices()
        batches = len(self)
        if self.position.batch > batches:
            raise InputError(f"cannot resume at batch {self.position.batch} of epoch {self.position.epoch}: a pass "
                             f"has {batches} batches; resume with the dataset, batch size and world size it was "
                             "saved with")
        remaining = indices[self.position.batch * self.batch_size:]
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=remaining, num_workers=self.num_workers,
                          collate_fn=_collate_in_worker, drop_last=self.drop_last, generator=self._generator())

    def _shard_loader(self, worker_batches: tuple[int, ...], rotation: int) -> DataLoader:
        assert isinstance(self.dataset, CaptionImageShards)
        shards = list(self.dataset.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.position.epoch}").shuffle(shards)  # the same order on every rank
        shard_pass = _ShardPass(self.dataset, shards[self.rank::self.world_size], self._logical_workers, rotation,
                                worker_batches, self.batch_size, self.shuffle_buffer if self.shuffle else 0,
                                f"{self.seed}-{self.position.epoch}-{self.rank}")
        return DataLoader(shard_pass, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=_collate_in_worker, drop_last=self.drop_last, generator=self._generator())

    def _resume_counts(self) -> tuple[tuple[int, ...], int]:
        """Per-worker batches already yielded and the worker whose batch comes next.

        The DataLoader takes batches from its workers round-robin, so starting its first worker on the logical
        worker that was next keeps the interrupted run's order.
        """
        workers, position = self._logical_workers, self.position
        if position.worker_batches:
            if len(position.worker_batches) != workers:
                raise InputError(f"the data position was saved with {len(position.worker_batches)} loader workers; "
                                 f"resume a shard dataset with the same num_workers (got {self.num_workers})")
            return position.worker_batches, position.next_worker
        # A position written by hand: assume no worker had run out yet (round-robin from worker 0).
        done = position.batch
        return tuple(max(0, -(-(done - w) // workers)) for w in range(workers)), done % workers


class _ShardPass(IterableDataset):
    """One rank's shards for one pass, split over loader workers, each skipping the batches it already gave."""

    def __init__(self, dataset: CaptionImageShards, shards: list[str], workers: int, rotation: int,
                 worker_batches: tuple[int, ...], batch_size: int, shuffle_buffer: int, seed: str) -> None:
        self.dataset, self.shards, self.workers, self.rotation = dataset, shards, workers, rotation
        self.worker_batches, self.batch_size, self.shuffle_buffer, self.seed = (
            worker_batches, batch_size, shuffle_buffer, seed)

    def __iter__(self) -> Iterator[Sample | Failed]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.workers
        skip = self.worker_batches[logical] * self.batch_size  # a batch is batch_size entries, failed ones included
        rng = random.Random(f"{self.seed}-{logical}")
        yield from self.dataset.stream(self.shards[logical::self.workers], skip, self.shuffle_buffer, rng)


def make_loader(dataset: CaptionImageTSV | CaptionImageShards, batch_size: int, *, seed: int = 0,
                start: DataPosition | None = None, shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                skips: SkipCounter | None = None, group_size: int = 1) -> TrainLoader:
    """A :class:`TrainLoader` over ``dataset`` for rank ``rank`` of ``world_size``, starting at ``start``.

    Every batch holds ``batch_size`` dataset entries before failed ones are dropped (so a batch may be smaller,
    or None), which keeps data positions independent of which samples fail.

    TSV: each epoch draws one permutation from ``(seed, epoch)`` (``DistributedSampler``; ranks take disjoint
    strided slices of it, the last ``len % world_size`` entries dropped so every rank gets as many batches).
    ``group_size`` > 1 permutes groups of that many consecutive entries instead (what a dataset writes side by side
    stays side by side: hard negatives share a batch when ``batch_size`` is a multiple of ``group_size``); ranks
    take whole groups, and a last incomplete group is dropped.
    Resuming is exact: ``make_loader(..., start=DataPosition(epoch, b))`` yields exactly the batches that an
    uninterrupted run would have yielded after its first ``b`` batches of ``epoch``, with any ``num_workers``,
    given the same dataset, ``batch_size``, ``seed``, ``shuffle``, ``drop_last`` and ``world_size``.

    Shards: each epoch shuffles the shard order from ``(seed, epoch)``; rank ``r`` reads shards ``r::world_size``
    of it and its loader workers split those again. ``shuffle_buffer`` > 1 also shuffles samples through a buffer
    seeded per epoch, rank and worker. There are no per-shard lengths, so ranks may get unequal batch counts: write
    equal shards, a multiple of ``world_size * num_workers`` of them, or train for a fixed number of steps.
    Resuming skips the consumed entries per worker without decoding them and is exact (same batches, same order)
    when the shards, ``batch_size``, ``seed``, ``shuffle``, ``shuffle_buffer``, ``world_size`` and ``num_workers``
    are those of the saved run and the position is one this loader recorded; a hand-written
    ``DataPosition(epoch, b)`` is exact only while no worker had run out of shards by batch ``b``.
    """
    start = start or DataPosition()
    problems = []
    if batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        problems.append(f"num_workers must be 0 or more, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        problems.append(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
    if start.epoch < 0 or start.batch < 0:
        problems.append(f"the start position must not be negative, got {start}")
    if group_size < 1:
        problems.append(f"group_size must be at least 1, got {group_size}")
    elif group_size > 1 and not isinstance(dataset, CaptionImageTSV):
        problems.append("group_size applies to TSV datasets only (shards stream in their own order)")
    if problems:
        raise InputError("; ".join(problems))
    if isinstance(dataset, CaptionImageShards) and len(dataset.shards) < world_size:
        raise InputError(f"{len(dataset.shards)} shards cannot feed {world_size} ranks; write at least one shard "
                         "per rank")
    return TrainLoader(dataset, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                       rank=rank, world_size=world_size, start=start, shuffle_buffer=shuffle_buffer,
                       skips=skips if skips is not None else SkipCounter(), group_size=group_size)
