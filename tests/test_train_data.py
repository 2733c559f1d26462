"""The training data pipeline: tokenisation, skipped samples, TSV and shard datasets, resume, rank splits, SD targets
and the synthetic shapes dataset. Everything runs offline on the tiny checkpoint."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill.errors import InputError
from gill.tiny import COLOURS
from gill.training.batch import Batch
from gill.training.data import (
    BAD_TARGET,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    MISSING_TARGET,
    UNREADABLE_IMAGE,
    UNREADABLE_SHARD,
    CaptionImageShards,
    CaptionImageTSV,
    DataPosition,
    Failed,
    SampleEncoder,
    collate,
    make_loader,
    open_dataset,
    target_path,
)
from gill.training.sd_targets import preprocess_sd_targets
from gill.training.shapes import make_shapes_dataset

N_TRAIN = 24
PER_SHARD = 5  # 24 samples -> shards of 5, 5, 5, 5, 4: two loader workers get 3 and 2 shards, so one runs out first


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> SampleEncoder:
    return SampleEncoder.from_checkpoint(tiny_dir)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=N_TRAIN, n_val=4, image_size=32, seed=0,
                               shards=True, samples_per_shard=PER_SHARD)


def keys_of(batches: list[Batch | None]) -> list[list[str] | None]:
    return [None if batch is None else batch.keys for batch in batches]


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def test_caption_tokens_are_bos_caption_img_then_padding(encoder):
    caption_ids = encoder.tokenizer("a red circle on a blue background").input_ids
    input_ids, attention_mask = encoder.tokenize("a red circle on a blue background")
    n, img = len(caption_ids), list(encoder.tokens.img)
    assert input_ids.dtype == attention_mask.dtype == torch.int64 and input_ids.shape == (32,)
    assert input_ids[0] == encoder.tokenizer.bos_token_id == 2  # OPT's BOS is </s>
    assert input_ids[:n].tolist() == caption_ids
    assert input_ids[n:n + 8].tolist() == img
    assert set(input_ids[n + 8:].tolist()) == {encoder.tokens.pad}
    assert attention_mask.tolist() == [1] * (n + 8) + [0] * (32 - n - 8)


def test_long_caption_is_truncated_and_still_ends_with_img_tokens(encoder):
    caption = " ".join(["a red circle on a blue background"] * 10)
    caption_ids = encoder.tokenizer(caption).input_ids
    assert len(caption_ids) > 32
    input_ids, attention_mask = encoder.tokenize(caption)
    assert input_ids[:24].tolist() == caption_ids[:24]  # BOS and the first 23 caption tokens
    assert input_ids[24:].tolist() == list(encoder.tokens.img)
    assert attention_mask.tolist() == [1] * 32
    with pytest.raises(InputError, match="max_len"):
        SampleEncoder(encoder.image_processor, encoder.tokenizer, encoder.tokens, encoder.target_shape, max_len=9)


# ---------------------------------------------------------------------------------------------------------------
# Failed samples are skipped and counted, never replaced


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, encoder, num_workers):
    data = make_shapes_dataset(tmp_path, n_train=12, n_val=1, seed=1)
    images = data.image_dir / "images"
    (images / "train-000003.png").write_bytes(b"this is not a png")
    truncated = (images / "train-000005.png").read_bytes()
    (images / "train-000005.png").write_bytes(truncated[: len(truncated) // 2])
    (images / "train-000007.png").unlink()
    loader = make_loader(CaptionImageTSV(data.train_tsv, encoder), batch_size=4, shuffle=False, drop_last=False,
                         num_workers=num_workers)
    batches = list(loader)
    assert [len(batch) for batch in batches] == [3, 2, 4]  # the failed ones are dropped, not replaced
    failed = {f"images/train-00000{i}.png" for i in (3, 5, 7)}
    assert [key for batch in batches for key in batch.keys] == [
        f"images/train-{i:06d}.png" for i in range(12) if f"images/train-{i:06d}.png" not in failed]
    assert loader.skips.total == 3
    assert loader.skips.by_reason == {UNREADABLE_IMAGE: 2, MISSING_IMAGE: 1}
    assert "3 samples skipped" in str(loader.skips)


def test_a_batch_whose_samples_all_failed_is_none(tmp_path, encoder):
    assert collate([Failed("a", MISSING_IMAGE), Failed("b", UNREADABLE_IMAGE)]) is None
    data = make_shapes_dataset(tmp_path, n_train=6, n_val=1, seed=2)
    for index in range(3):
        (data.image_dir / "images" / f"train-{index:06d}.png").unlink()
    loader = make_loader(CaptionImageTSV(data.train_tsv, encoder), batch_size=3, shuffle=False)
    batches = list(loader)
    assert batches[0] is None and len(batches[1]) == 3
    assert loader.skips.by_reason == {MISSING_IMAGE: 3}
    assert loader.position == DataPosition(epoch=1, batch=0)


def test_data_whose_every_sample_fails_stops_training_with_the_reasons(tmp_path, encoder):
    """Not an endless loop of empty batches: a pass with no usable sample is an error that says why."""
    data = make_shapes_dataset(tmp_path, n_train=4, n_val=1, seed=2)
    (tmp_path / "empty-targets").mkdir()  # a folder with no target in it: every sample fails
    dataset = CaptionImageTSV(data.train_tsv, encoder, targets_dir=tmp_path / "empty-targets")
    with pytest.raises(InputError, match="no batch.*4 samples skipped.*preprocess_sd_targets"):
        run(make_loader(dataset, batch_size=2), 10)


def test_bad_captions_shards_and_tsv_headers(tmp_path, encoder, shapes):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("caption\timage\n  \timages/train-000000.png\na shape\timages/nowhere.png\n")
    dataset = CaptionImageTSV(tsv, encoder, image_dir=shapes.image_dir)
    assert [dataset[0].reason, dataset[1].reason] == [EMPTY_CAPTION, MISSING_IMAGE]
    (tmp_path / "no_image.tsv").write_text("caption\turl\na shape\thttp://x/1.jpg\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['image'\]"):
        CaptionImageTSV(tmp_path / "no_image.tsv", encoder)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file" * 100)
    loader = make_loader(CaptionImageShards([str(shapes.train_shards[0]), str(garbage)], encoder), batch_size=4,
                         shuffle=False, drop_last=False)
    assert sum(len(batch) for batch in loader if batch is not None) == PER_SHARD
    assert loader.skips.by_reason == {UNREADABLE_SHARD: 1}
    with pytest.raises(InputError, match="not found"):
        CaptionImageShards(str(tmp_path / "missing-{000000..000001}.tar"), encoder)


# ---------------------------------------------------------------------------------------------------------------
# TSV and shards agree; resume; rank splits


def test_shards_yield_what_the_tsv_yields(shapes, encoder):
    from_tsv = list(CaptionImageTSV(shapes.train_tsv, encoder))
    from_shards = list(open_dataset(shapes.shard_pattern("train"), encoder))
    assert len(from_tsv) == len(from_shards) == N_TRAIN
    for row, sample in zip(from_tsv, from_shards, strict=True):
        assert row.key == f"images/{sample.key}.png"
        assert row.caption == sample.caption
        assert torch.equal(row.pixel_values, sample.pixel_values)
        assert row.pixel_values.shape == (3, 32, 32) and row.pixel_values.dtype == torch.float32
        assert torch.equal(row.input_ids, sample.input_ids)


def run(loader, count: int) -> tuple[list[Batch | None], list[DataPosition]]:
    """The first ``count`` batches of ``loader.forever()`` and the position after each."""
    batches, positions = [], []
    for batch in loader.forever():
        batches.append(batch)
        positions.append(loader.position)
        if len(batches) == count:
            break
    return batches, positions


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tsv_resume_yields_the_batches_an_uninterrupted_run_would(shapes, encoder, num_workers):
    dataset = CaptionImageTSV(shapes.train_tsv, encoder)
    loader = make_loader(dataset, batch_size=5, seed=3, num_workers=num_workers)
    assert len(loader) == 4  # 24 // 5, the last partial batch dropped
    full, positions = run(loader, 8)  # two epochs
    assert keys_of(full[:4]) != keys_of(full[4:])  # each epoch has its own permutation
    for done in (2, 4, 5):  # mid-epoch, at the epoch boundary, in the second epoch
        start = DataPosition.from_dict(positions[done - 1].to_dict())
        resumed, _ = run(make_loader(dataset, batch_size=5, seed=3, num_workers=num_workers, start=start), 8 - done)
        assert keys_of(resumed) == keys_of(full[done:])
        assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
                   for a, b in zip(resumed, full[done:], strict=True))
    with pytest.raises(InputError, match="cannot resume"):
        list(make_loader(dataset, batch_size=5, start=DataPosition(0, 9)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_resume_yields_the_batches_an_uninterrupted_run_would(shapes, encoder, num_workers):
    dataset = CaptionImageShards(shapes.shard_pattern("train"), encoder)

    def loader(start=None):
        return make_loader(dataset, batch_size=2, seed=5, drop_last=False, shuffle_buffer=4,
                           num_workers=num_workers, start=start)

    one_epoch = len(list(loader()))
    full, positions = run(loader(), one_epoch + 2)
    assert sorted(k for batch in full[:one_epoch] for k in batch.keys) == [f"train-{i:06d}" for i in range(N_TRAIN)]
    # Resume early, after one loader worker ran out of shards (the last batches), and in the next epoch.
    for done in (1, 3, one_epoch - 2, one_epoch + 1):
        start = DataPosition.from_dict(positions[done - 1].to_dict())
        resumed, _ = run(loader(start), one_epoch + 2 - done)
        assert keys_of(resumed) == keys_of(full[done:])


def test_ranks_split_the_data_without_overlap(shapes, encoder):
    tsv = CaptionImageTSV(shapes.train_tsv, encoder)
    shards = CaptionImageShards(shapes.shard_pattern("train"), encoder)
    for dataset in (tsv, shards):
        per_rank = [[key for batch in make_loader(dataset, batch_size=1, seed=7, rank=rank, world_size=2)
                     for key in batch.keys] for rank in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0] + per_rank[1])) == N_TRAIN
        if dataset is shards:  # whole shards per rank
            shard_sets = [{int(key[-6:]) // PER_SHARD for key in keys} for keys in per_rank]
            assert not shard_sets[0] & shard_sets[1]
    with pytest.raises(InputError, match="rank"):
        make_loader(tsv, batch_size=1, rank=2, world_size=2)


def test_entries_are_dealt_as_distributed_sampler_deals_them(shapes, encoder):
    """Runs saved before groups existed resume on the same permutation."""
    from torch.utils.data import DistributedSampler

    dataset = CaptionImageTSV(shapes.train_tsv, encoder)
    for world_size, shuffle, epoch in ((1, True, 0), (2, True, 3), (3, False, 1), (5, True, 2)):
        for rank in range(world_size):
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=4,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            loader = make_loader(dataset, batch_size=1, seed=4, shuffle=shuffle, rank=rank, world_size=world_size,
                                 start=DataPosition(epoch, 0))
            assert loader._tsv_indices() == list(sampler) and len(loader) == len(sampler)


def test_groups_of_consecutive_rows_share_a_batch_resume_and_split_across_ranks(shapes, encoder):
    dataset = CaptionImageTSV(shapes.train_tsv, encoder)

    def groups(batch: Batch) -> list[list[int]]:
        rows = [int(key.removesuffix(".png")[-6:]) for key in batch.keys]
        return [rows[i:i + 4] for i in range(0, len(rows), 4)]

    loader = make_loader(dataset, batch_size=8, seed=3, group_size=4)
    assert len(loader) == N_TRAIN // 8
    full, positions = run(loader, 2 * len(loader))
    for batch in full:  # whole groups, in their written order
        assert all(group == list(range(group[0], group[0] + 4)) and group[0] % 4 == 0 for group in groups(batch))
    first_epoch = sorted(row for batch in full[:len(loader)] for group in groups(batch) for row in group)
    assert first_epoch == list(range(N_TRAIN))
    assert keys_of(full[:len(loader)]) != keys_of(full[len(loader):])  # each epoch has its own permutation
    resumed, _ = run(make_loader(dataset, batch_size=8, seed=3, group_size=4, start=positions[1]), len(full) - 2)
    assert keys_of(resumed) == keys_of(full[2:])
    per_rank = [[group for batch in make_loader(dataset, batch_size=4, seed=7, rank=rank, world_size=2,
                                                group_size=4) for group in groups(batch)] for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // 8
    assert not {g[0] for g in per_rank[0]} & {g[0] for g in per_rank[1]}
    with pytest.raises(InputError, match="group_size must be at least 1"):
        make_loader(dataset, batch_size=4, group_size=0)
    with pytest.raises(InputError, match="TSV datasets only"):
        make_loader(CaptionImageShards(shapes.shard_pattern("train"), encoder), batch_size=4, group_size=2)


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion targets


def text_encoder_states(tiny_dir: Path, captions: list[str]) -> np.ndarray:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "sd" / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_dir / "sd" / "text_encoder").eval()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.numpy().astype(np.float16)


def test_sd_targets_match_the_text_encoder_and_resume(tmp_path, tiny_dir, shapes):
    out = tmp_path / "targets"
    counts = preprocess_sd_targets(shapes.train_tsv, tiny_dir, out, batch_size=64, progress=False)
    assert (counts.written, counts.skipped_existing, counts.failed) == (N_TRAIN, 0, 0)
    rows = [line.split("\t") for line in shapes.train_tsv.read_text().splitlines()[1:]]
    expected = text_encoder_states(tiny_dir, [caption for caption, _ in rows])
    gen_emb_dim = expected.shape[-1]
    for (_, image), states in zip(rows, expected, strict=True):
        written = np.load(target_path(out, image))
        assert written.shape == (77, gen_emb_dim) and written.dtype == np.float16
        assert np.array_equal(written, states)

    again = preprocess_sd_targets(shapes.train_tsv, tiny_dir, out, progress=False)
    assert (again.written, again.skipped_existing) == (0, N_TRAIN)
    paths = [target_path(out, image) for _, image in rows]
    paths[0].unlink()
    paths[1].write_bytes(paths[1].read_bytes()[:300])  # truncated, as by a crash without the atomic rename
    paths[2].write_bytes(b"garbage")
    np.save(paths[3], np.zeros((10, gen_emb_dim), np.float16))  # another shape
    repaired = preprocess_sd_targets(shapes.train_tsv, tiny_dir, out, progress=False)
    assert (repaired.written, repaired.skipped_existing, repaired.failed) == (4, N_TRAIN - 4, 0)
    assert all(np.array_equal(np.load(path), states) for path, states in zip(paths[:4], expected, strict=False))
    assert not list(out.glob("*.tmp"))

    shard_counts = preprocess_sd_targets(shapes.shard_pattern("train"), tiny_dir, tmp_path / "by_key", progress=False)
    assert shard_counts.written == N_TRAIN
    assert np.array_equal(np.load(target_path(tmp_path / "by_key", "train-000000")), expected[0])


def test_datasets_read_sd_targets(tmp_path, tiny_dir, encoder, shapes):
    from webdataset import TarWriter

    out = tmp_path / "targets"
    preprocess_sd_targets(shapes.train_tsv, tiny_dir, out, progress=False)
    gen_emb_dim = encoder.target_shape[1]
    target_path(out, "images/train-000001.png").unlink()
    np.save(target_path(out, "images/train-000002.png"), np.zeros((77, gen_emb_dim + 1), np.float16))
    loader = make_loader(CaptionImageTSV(shapes.train_tsv, encoder, targets_dir=out), batch_size=6, shuffle=False)
    batch = next(iter(loader))
    assert batch.keys == ["images/train-000000.png"] + [f"images/train-{i:06d}.png" for i in range(3, 6)]
    assert batch.sd_targets.shape == (4, 77, gen_emb_dim) and batch.sd_targets.dtype == torch.float32
    assert torch.equal(batch.sd_targets[0], torch.from_numpy(np.load(target_path(out, batch.keys[0]))).float())
    assert loader.skips.by_reason == {MISSING_TARGET: 1, BAD_TARGET: 1}
    assert next(iter(make_loader(CaptionImageTSV(shapes.train_tsv, encoder), batch_size=2))).sd_targets is None

    # A shard may carry each sample's target as its own .npy member.
    shard = tmp_path / "with-targets.tar"
    with TarWriter(str(shard)) as writer:
        for index in (0, 3):
            buffer = io.BytesIO()
            np.save(buffer, np.load(target_path(out, f"images/train-{index:06d}.png")))
            writer.write({"__key__": f"s{index}", "txt": f"caption {index}", "npy": buffer.getvalue(),
                          "png": (shapes.image_dir / "images" / f"train-{index:06d}.png").read_bytes()})
    samples = list(CaptionImageShards([str(shard)], encoder, with_targets=True))
    assert torch.equal(samples[1].sd_target, torch.from_numpy(np.load(target_path(out, "images/train-000003.png"))))
    without = list(CaptionImageShards(shapes.train_shards[0:1], encoder, with_targets=True))
    assert {s.reason for s in without} == {MISSING_TARGET}


def test_target_paths_stay_inside_the_folder_and_are_distinct(tmp_path):
    assert target_path(tmp_path, "../../etc/passwd").parent == tmp_path
    assert target_path(tmp_path, "/abs/x.jpg").parent == tmp_path
    assert target_path(tmp_path, "a/b.jpg") != target_path(tmp_path, "a_b.jpg")
    long = target_path(tmp_path, "x" * 500)
    assert long.parent == tmp_path and len(long.name) < 100


# ---------------------------------------------------------------------------------------------------------------
# The synthetic shapes dataset


def test_shapes_dataset_is_deterministic_and_captions_describe_the_images(tmp_path, shapes):
    again = make_shapes_dataset(tmp_path / "again", n_train=N_TRAIN, n_val=4, seed=0, shards=True,
                                samples_per_shard=PER_SHARD)
    other = make_shapes_dataset(tmp_path / "other", n_train=N_TRAIN, n_val=4, seed=1)
    assert again.train_tsv.read_text() == shapes.train_tsv.read_text()
    assert [p.read_bytes() for p in again.train_shards] == [p.read_bytes() for p in shapes.train_shards]
    assert other.train_tsv.read_text() != shapes.train_tsv.read_text()
    assert len(shapes.val_tsv.read_text().splitlines()) == 1 + 4
    for line in shapes.train_tsv.read_text().splitlines()[1:]:
        caption, image = line.split("\t")
        _, colour, shape, _, _, background, _ = caption.split()
        with Image.open(shapes.image_dir / image) as picture:
            assert picture.size == (32, 32)
            assert picture.getpixel((16, 20)) == COLOURS[colour]  # inside every shape
            assert picture.getpixel((1, 1)) == COLOURS[background]
    assert {line.split()[2] for line in shapes.train_tsv.read_text().splitlines()[1:]} <= {"circle", "square",
                                                                                           "triangle"}


def test_shapes_dataset_is_fast(tmp_path):
    import time

    begin = time.perf_counter()
    make_shapes_dataset(tmp_path, n_train=300, n_val=50, image_size=32, seed=0, shards=True)
    assert time.perf_counter() - begin < 2.0
