"""Host outputs of one response packed into a single bfloat16 tensor, for the server's own BLS calls.

Why: Triton 2.51's Python-backend stub (and python_backend up to at least 2026) turns every CPU output of a BLS
response into a numpy array without holding the GIL: on its IPC thread for a decoupled stream, inside
``InferRequest.exec`` (which releases the GIL) otherwise. A numpy allocation racing Python code on another thread
corrupts the interpreter's heap; the ``gill`` stub, with many turns in flight, died of it (a segfault in
``pymalloc_alloc`` under ``PbTensor::PbTensor``). The stub makes no numpy array for a bfloat16 tensor (numpy has
no such type) nor for a GPU tensor, so the server's models hand their host outputs to one another as one
bfloat16-typed blob and the caller unpacks it under the GIL. Clients outside the server see the usual outputs.

Layout: 8 bytes of little-endian length, then a safetensors file of the outputs, then one pad byte if needed to
make whole bfloat16 elements. A bytes output (``TYPE_STRING``) is stored as its concatenated bytes
(``NAME@bytes``), each element's length (``NAME@lengths``) and its shape (``NAME@shape``).
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

Output = np.ndarray | torch.Tensor

_BYTES, _LENGTHS, _SHAPE = "@bytes", "@lengths", "@shape"


def pack(outputs: dict[str, Output]) -> torch.Tensor:
    """``{name: array}`` (numeric numpy/torch on the host, or numpy ``object`` arrays of bytes) -> ``[L]`` bf16."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in outputs.items():
        if isinstance(value, np.ndarray) and value.dtype == np.object_:
            items = [bytes(item) for item in value.reshape(-1)]
            tensors[name + _BYTES] = torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).copy())
            tensors[name + _LENGTHS] = torch.tensor([len(item) for item in items], dtype=torch.int64)
            tensors[name + _SHAPE] = torch.tensor(value.shape, dtype=torch.int64)
        else:
            tensors[name] = torch.as_tensor(value).detach().cpu().contiguous()
    blob = save_safetensors(tensors)
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * (len(blob) % 2)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(torch.bfloat16)


def unpack(packed: torch.Tensor) -> dict[str, Output]:
    """The inverse of :func:`pack`: numeric outputs as torch tensors, bytes outputs as numpy ``object`` arrays."""
    data = packed.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    (length,) = struct.unpack_from("<Q", data)
    tensors = load_safetensors(data[8:8 + length])
    outputs: dict[str, Output] = {}
    for key, value in tensors.items():
        if key.endswith(_BYTES):
            name = key.removesuffix(_BYTES)
            raw = value.numpy().tobytes()
            ends = np.cumsum(tensors[name + _LENGTHS].numpy())
            items = [raw[end - size:end] for end, size in zip(ends, tensors[name + _LENGTHS].tolist())]
            array = np.empty(len(items), dtype=np.object_)
            array[:] = items
            outputs[name] = array.reshape(tuple(tensors[name + _SHAPE].tolist()))
        elif not key.endswith((_LENGTHS, _SHAPE)):
            outputs[key] = value
    return outputs
