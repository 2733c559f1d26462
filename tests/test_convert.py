import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gill.checkpoint import load_adapters
from gill.config import GILLArgs
from gill.convert import (
    ADAPTERS_FILE,
    DECISION_FILE,
    EMBEDDINGS_FILE,
    convert_directory,
    load_embeddings_pickle,
)
from gill.errors import CheckpointError, UnsafeFileError


def _official(tiny_dir, name):
    return torch.load(tiny_dir / name, weights_only=True)["state_dict"]


def test_converted_adapters_equal_the_official_tensors(tiny_dir):
    official = _official(tiny_dir, "pretrained_ckpt.pth.tar")
    converted = load_file(tiny_dir / ADAPTERS_FILE)
    assert set(converted) == set(official)
    assert "model.input_embeddings.weight" in converted and converted["model.input_embeddings.weight"].shape[0] == 8
    for key, tensor in official.items():
        assert torch.equal(converted[key], tensor), key


def test_round_trip_into_the_loaded_model(tiny_dir, pipeline):
    official = _official(tiny_dir, "pretrained_ckpt.pth.tar")
    model = pipeline.components.model
    assert torch.equal(model.adapters.visual_fc.weight, official["model.visual_fc.weight"].float())
    rows = model.lm.get_input_embeddings().weight[list(model.tokens.img)]
    assert torch.equal(rows, official["model.input_embeddings.weight"].float())
    decision = _official(tiny_dir, "decision_model.pth.tar")
    assert torch.equal(model.decision_head[1].weight, decision["1.weight"])


def test_embeddings_round_trip(tiny_dir):
    urls, matrix = load_embeddings_pickle(tiny_dir / "cc3m_embeddings_urls.npy")
    with np.load(tiny_dir / EMBEDDINGS_FILE) as data:
        assert list(data["urls"]) == urls
        np.testing.assert_array_equal(data["embeddings"], matrix)
    assert matrix.shape == (len(urls), 256)


def test_embeddings_saved_as_bf16_torch_tensors_load_too(tmp_path):
    # scripts/extract_img_embs.py in the reference saves bf16 torch tensors inside the pickle.
    vectors = [torch.randn(256, dtype=torch.bfloat16) for _ in range(3)]
    with open(tmp_path / "cc3m_embeddings_urls.npy", "wb") as handle:
        pickle.dump({"paths": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"], "embeddings": vectors}, handle)
    urls, matrix = load_embeddings_pickle(tmp_path / "cc3m_embeddings_urls.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (3, 256)
    np.testing.assert_array_equal(matrix[1], vectors[1].float().numpy())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_embeddings_pickle_that_carries_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "cc3m_embeddings_urls.npy", "wb") as handle:
        pickle.dump({"paths": ["x"], "embeddings": [_Exploit(marker)]}, handle)
    with pytest.raises(UnsafeFileError, match="posix.system|os.system|refused"):
        load_embeddings_pickle(tmp_path / "cc3m_embeddings_urls.npy")
    assert not marker.exists()


def test_checkpoint_pickle_that_carries_code_is_refused(tmp_path, tiny_dir):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, tmp_path / "pretrained_ckpt.pth.tar")
    with pytest.raises(UnsafeFileError, match="pretrained_ckpt.pth.tar"):
        convert_directory(tmp_path)
    assert not marker.exists()
    assert not (tmp_path / ADAPTERS_FILE).exists()


def test_legacy_non_zip_pickle_is_refused(tmp_path):
    with open(tmp_path / "decision_model.pth.tar", "wb") as handle:
        pickle.dump({"state_dict": {}}, handle)
    assert not zipfile.is_zipfile(tmp_path / "decision_model.pth.tar")
    with pytest.raises(UnsafeFileError, match="not a torch zip"):
        convert_directory(tmp_path)


def test_wrong_shapes_name_the_key(tmp_path, tiny_dir):
    state = _official(tiny_dir, "pretrained_ckpt.pth.tar")
    state["model.visual_embeddings.weight"] = state["model.visual_embeddings.weight"][:-4]
    del state["model.logit_scale"]
    (tmp_path / "model_args.json").write_bytes((tiny_dir / "model_args.json").read_bytes())
    torch.save({"state_dict": state}, tmp_path / "pretrained_ckpt.pth.tar")
    with pytest.raises(CheckpointError, match="model.logit_scale") as raised:
        convert_directory(tmp_path)
    assert "model.visual_embeddings.weight" in str(raised.value)


def test_module_prefix_from_distributed_training_is_stripped(tmp_path, tiny_dir):
    state = {"module." + k: v for k, v in _official(tiny_dir, "pretrained_ckpt.pth.tar").items()}
    (tmp_path / "model_args.json").write_bytes((tiny_dir / "model_args.json").read_bytes())
    torch.save({"state_dict": state}, tmp_path / "pretrained_ckpt.pth.tar")
    convert_directory(tmp_path)
    assert all(k.startswith("model.") for k in load_file(tmp_path / ADAPTERS_FILE))


def test_decision_head_with_wrong_keys_is_refused(tmp_path):
    torch.save({"state_dict": {"0.weight": torch.zeros(2, 8)}}, tmp_path / "decision_model.pth.tar")
    with pytest.raises(CheckpointError, match="decision head"):
        convert_directory(tmp_path)
    assert not (tmp_path / DECISION_FILE).exists()


def test_empty_directory_says_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match="pretrained_ckpt.pth.tar"):
        convert_directory(tmp_path)


def test_adapters_for_another_lm_width_are_refused(tiny_dir):
    args = GILLArgs.load(tiny_dir)
    with pytest.raises(CheckpointError, match="LM width"):
        load_adapters(tiny_dir, args, lm_width=4096, vision_width=32)
