"""The tensor helpers of gill.serving.backend against a stand-in for ``triton_python_backend_utils``.

The real module exists only inside Triton's backend stub; the served tests run these helpers for real (every
tensor between models goes through them). Here: dtypes and the DLPack hand-off, checked exactly.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
import torch.utils.dlpack


class FakeTensor:
    """What the helpers use of ``pb_utils.Tensor``: numpy or DLPack construction, ``is_cpu``, and the reads."""

    def __init__(self, name: str, value: np.ndarray | torch.Tensor, via: str = "numpy") -> None:
        self._name, self.value, self.via = name, value, via

    @classmethod
    def from_dlpack(cls, name: str, capsule) -> FakeTensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule), via="dlpack")

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return not isinstance(self.value, torch.Tensor) or self.value.device.type == "cpu"

    def as_numpy(self) -> np.ndarray:
        if isinstance(self.value, torch.Tensor):
            if self.value.device.type != "cpu":
                raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy")
            array = self.value.numpy()
        else:
            array = self.value
        array = array.view()
        array.flags.writeable = False  # as Triton's shared-memory inputs
        return array

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.as_tensor(self.value))


@pytest.fixture
def backend(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "gill.serving.backend", raising=False)
    module = importlib.import_module("gill.serving.backend")
    yield module
    sys.modules.pop("gill.serving.backend", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_tensors_travel_as_float32_through_dlpack(backend, dtype):
    source = torch.randn(2, 8, 5).to(dtype)
    out = backend.tensor("IMG_STATES", source[:1])  # a batch slice, as the mapper sends per request
    assert out.via == "dlpack" and out.value.dtype == torch.float32 and out.value.shape == (1, 8, 5)
    torch.testing.assert_close(out.value, source[:1].float())


def test_float32_tensors_are_not_copied(backend):
    source = torch.randn(3, 4)
    assert backend.tensor("PREFIX", source).value.data_ptr() == source.data_ptr()


def test_integer_tensors_and_numpy_arrays_keep_their_dtype(backend):
    ids = backend.tensor("INPUT_IDS", torch.tensor([2, -1, 7]))
    assert ids.via == "dlpack" and ids.value.dtype == torch.int64
    for array in (np.array([3], dtype=np.int32), np.array([1.5], dtype=np.float32), np.array([True])):
        out = backend.tensor("X", array)
        assert out.via == "numpy" and out.value.dtype == array.dtype
    flag = backend.tensor("FORCE_IMAGE", torch.tensor([True]))
    assert flag.via == "numpy" and flag.value.dtype == np.bool_


def test_torch_input_copies_cpu_inputs_and_reports_missing_ones(backend):
    from gill.errors import InputError

    request = {"IMG_STATES": FakeTensor("IMG_STATES", np.ones((1, 8, 4), dtype=np.float32))}
    states = backend.torch_input(request, "IMG_STATES", torch.device("cpu"))
    assert states.dtype == torch.float32 and states.shape == (1, 8, 4)
    states += 1  # a private copy: Triton's input memory is read-only
    assert backend.torch_input(request, "VISUAL_PREFIX", "cpu", required=False) is None
    with pytest.raises(InputError, match="missing input tensor PROMPT_EMBEDS"):
        backend.torch_input(request, "PROMPT_EMBEDS", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_stay_on_the_gpu(backend):
    source = torch.randn(1, 77, 16, device="cuda", dtype=torch.bfloat16)
    out = backend.tensor("PROMPT_EMBEDS", source)
    assert out.value.device.type == "cuda" and out.value.dtype == torch.float32 and not out.is_cpu()
    received = backend.torch_input({"PROMPT_EMBEDS": out}, "PROMPT_EMBEDS", "cuda")
    assert received.data_ptr() == out.value.data_ptr()  # no copy on the way in
