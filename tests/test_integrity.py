"""Checkpoint integrity: a missing file, a changed byte or a wrong shape refuses to start, naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_download import make_mirror, write_manifest
from typer.testing import CliRunner

from gill import download as dl
from gill import integrity
from gill.cli import app
from gill.convert import ADAPTERS_FILE, DECISION_FILE, convert_directory
from gill.errors import CheckpointError
from gill.integrity import (
    CHECKSUMS_FILE,
    VERIFIED_FILE,
    checkpoint_files,
    read_checksums,
    verify_checkpoint,
    write_checksums,
)
from gill.serving.server import TritonServer


@pytest.fixture
def checkpoint(tmp_path, tiny_dir) -> Path:
    """A copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "checkpoint"))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset  # the middle: tensor data, so the file still parses
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_checkpoint_passes_and_sha256sum_agrees(checkpoint):
    listed = read_checksums(checkpoint)
    assert listed is not None and list(listed) == checkpoint_files(checkpoint)
    assert {"model_args.json", ADAPTERS_FILE, DECISION_FILE, "lm/model.safetensors", "clip/model.safetensors",
            "sd/unet/diffusion_pytorch_model.safetensors"} <= set(listed)
    assert not {".complete", CHECKSUMS_FILE, VERIFIED_FILE} & set(listed)
    result = verify_checkpoint(checkpoint)
    assert result.listed == len(listed) and result.hashed <= len(listed)
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "--check", "--quiet", CHECKSUMS_FILE], cwd=checkpoint,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_missing_listed_file_is_named(checkpoint):
    (checkpoint / "sd/unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as raised:
        verify_checkpoint(checkpoint)
    message = str(raised.value)
    assert f"{checkpoint}/sd/unet/diffusion_pytorch_model.safetensors: missing (listed in SHA256SUMS)" in message
    assert "gill make-tiny" in message


def test_required_files_are_checked_without_sha256sums(checkpoint):
    (checkpoint / CHECKSUMS_FILE).unlink()
    assert verify_checkpoint(checkpoint).listed == 0
    (checkpoint / ADAPTERS_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{ADAPTERS_FILE}: missing; run `gill convert "):
        verify_checkpoint(checkpoint)
    (checkpoint / "model_args.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_args.json: missing.*gill download.*gill make-tiny"):
        verify_checkpoint(checkpoint)


def test_a_flipped_byte_is_a_sha256_mismatch_that_says_what_to_run(checkpoint):
    expected = read_checksums(checkpoint)["lm/model.safetensors"]
    _flip_byte(checkpoint / "lm/model.safetensors")
    with pytest.raises(CheckpointError) as raised:
        verify_checkpoint(checkpoint)
    message = str(raised.value)
    assert f"{checkpoint}/lm/model.safetensors: sha256 mismatch: expected {expected}" in message
    assert integrity._sha256(checkpoint / "lm/model.safetensors") in message
    assert "gill make-tiny" in message and "--record" in message

    # A converted file: `gill convert` rewrites it from the official file, and then the checkpoint passes.
    _flip_byte(checkpoint / "lm/model.safetensors")
    _flip_byte(checkpoint / ADAPTERS_FILE)
    with pytest.raises(CheckpointError, match=rf"{ADAPTERS_FILE}: sha256 mismatch.*gill convert"):
        verify_checkpoint(checkpoint)
    convert_directory(checkpoint)
    verify_checkpoint(checkpoint)


def test_unchanged_files_are_not_hashed_again_but_a_rewritten_one_is(checkpoint, monkeypatch):
    monkeypatch.setattr(integrity, "_RACY_NS", 0)  # the copy is brand new; a real one is older than 2 s
    listed = len(read_checksums(checkpoint))
    assert verify_checkpoint(checkpoint).hashed == listed
    assert verify_checkpoint(checkpoint).hashed == 0
    assert verify_checkpoint(checkpoint, full=True).hashed == listed
    time.sleep(0.05)  # past the file system's timestamp granularity
    _flip_byte(checkpoint / "clip/model.safetensors")
    with pytest.raises(CheckpointError, match="clip/model.safetensors: sha256 mismatch"):
        verify_checkpoint(checkpoint)
    _flip_byte(checkpoint / "clip/model.safetensors")
    assert verify_checkpoint(checkpoint).hashed == 1
    (checkpoint / VERIFIED_FILE).write_text("{not json")  # damaged records only cost a rehash
    assert verify_checkpoint(checkpoint).hashed == listed


def test_files_changed_just_now_get_no_record(checkpoint):
    verify_checkpoint(checkpoint)
    records = json.loads((checkpoint / VERIFIED_FILE).read_text())["files"]
    assert ADAPTERS_FILE not in records  # copied under 2 s ago: its timestamps could still hide a change


def _rewrite_adapters(directory: Path, change) -> None:
    path = directory / ADAPTERS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    change(state)
    save_file(state, str(path), metadata=metadata)
    write_checksums(directory)  # recorded as is: the shapes, not the sha256, must stop it


def test_adapters_for_another_vision_width_refuse_to_start_naming_the_file(checkpoint):
    def widen(state):  # adapters trained on a 48-wide vision encoder; the checkpoint's CLIP is 32 wide
        for key in ("model.visual_fc.weight", "model.visual_embeddings.weight"):
            state[key] = torch.zeros(state[key].shape[0], 48, dtype=state[key].dtype)

    _rewrite_adapters(checkpoint, widen)
    server = TritonServer(checkpoint, models=("mapper",))
    started = time.monotonic()
    with pytest.raises(CheckpointError) as raised:
        server.start(timeout=120)
    assert time.monotonic() - started < 20
    assert server.process is None  # refused before any Triton process
    message = str(raised.value)
    assert f"{checkpoint}/{ADAPTERS_FILE}: adapters were trained for LM width 64 and vision width 48" in message
    assert "base models have 64 and 32" in message


def test_a_mis_shaped_adapter_key_and_decision_head_are_named(checkpoint):
    def shrink(state):
        state["model.visual_embeddings.weight"] = state["model.visual_embeddings.weight"][:-4].clone()

    _rewrite_adapters(checkpoint, shrink)
    with pytest.raises(CheckpointError, match=rf"{ADAPTERS_FILE}: .*wrong shapes model.visual_embeddings.weight"):
        verify_checkpoint(checkpoint)

    convert_directory(checkpoint)  # the official adapters again
    save_file({"1.weight": torch.zeros(2, 63), "1.bias": torch.zeros(2)}, str(checkpoint / DECISION_FILE))
    write_checksums(checkpoint)
    with pytest.raises(CheckpointError, match=rf"{DECISION_FILE}: expected 1.weight of shape \(2, 64\)"):
        verify_checkpoint(checkpoint)


def test_gill_serve_exits_non_zero_naming_the_file_before_triton_starts(checkpoint):
    (checkpoint / "lm/model.safetensors").unlink()
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(checkpoint), "--grpc-port", "0",
                                      "--http-port", "0", "--metrics-port", "0"])
    assert result.exit_code == 2, result.output
    assert f"{checkpoint}/lm/model.safetensors: missing (listed in SHA256SUMS)" in result.output
    assert "Traceback" not in result.output


def test_gill_verify_checks_and_records(checkpoint):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(checkpoint)])
    assert ok.exit_code == 0 and "files ok" in ok.output
    (checkpoint / "model_args.json").write_text((checkpoint / "model_args.json").read_text() + "\n")
    failed = runner.invoke(app, ["verify", str(checkpoint)])
    assert failed.exit_code == 2 and "model_args.json: sha256 mismatch" in failed.output
    recorded = runner.invoke(app, ["verify", str(checkpoint), "--record"])
    assert recorded.exit_code == 0, recorded.output
    verify_checkpoint(checkpoint)


def test_an_unlisted_served_file_is_refused(checkpoint):
    entries = read_checksums(checkpoint)
    del entries[DECISION_FILE]
    (checkpoint / CHECKSUMS_FILE).write_text("".join(f"{d}  {r}\n" for r, d in entries.items()))
    with pytest.raises(CheckpointError, match=rf"{DECISION_FILE}: not listed in SHA256SUMS"):
        verify_checkpoint(checkpoint)
    (checkpoint / CHECKSUMS_FILE).write_text("not a checksum line\n")
    with pytest.raises(CheckpointError, match=r"SHA256SUMS:1: expected '<64 hex digits>  <relative path>'"):
        verify_checkpoint(checkpoint)


def test_download_lists_the_hashes_it_verified_without_hashing_again(tmp_path, monkeypatch):
    def no_hashing(path, bar=None):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(integrity, "_sha256", no_hashing)
    target = tmp_path / "out"
    dl.download(target, manifest=write_manifest(tmp_path), source_dir=make_mirror(tmp_path / "mirror"), quiet=True)
    lock = json.loads((target / dl.LOCK_FILE).read_text())["files"]
    assert read_checksums(target) == {path: record["sha256"] for path, record in lock.items()}
