"""Convert the official GILL release files to safe formats, without running pickled code.

- ``pretrained_ckpt.pth.tar``: torch zip pickle ``{'state_dict': {key: bf16 tensor}}``
  -> ``gill_adapters.safetensors``
- ``decision_model.pth.tar``: torch zip pickle ``{'state_dict': {'1.weight', '1.bias'}}``, storages tagged
  ``cuda:0`` -> ``decision_model.safetensors``
- ``cc3m_embeddings_urls.npy``: a plain pickle (not NumPy format) ``{'paths': [url], 'embeddings': [256-d]}``
  -> ``retrieval_embeddings.npz``

The torch files are read with ``torch.load(weights_only=True, map_location='cpu')``; the embeddings
pickle with an unpickler that only rebuilds arrays, tensors, lists, dicts and strings. Anything else
(for example a pickle that would call ``os.system``) is refused with :class:`UnsafeFileError`.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gill.errors import CheckpointError, UnsafeFileError

OFFICIAL_ADAPTERS = "pretrained_ckpt.pth.tar"
OFFICIAL_DECISION = "decision_model.pth.tar"
OFFICIAL_EMBEDDINGS_GLOB = "cc3m*.npy"
ADAPTERS_FILE = "gill_adapters.safetensors"
DECISION_FILE = "decision_model.safetensors"
EMBEDDINGS_FILE = "retrieval_embeddings.npz"


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``{'state_dict': ...}`` from a torch pickle, loaded with ``weights_only=True`` on the CPU."""
    if not zipfile.is_zipfile(path):
        # Legacy (non-zip) torch files and plain pickles are refused: the release files are zip archives.
        raise UnsafeFileError(f"{path}: not a torch zip checkpoint; refusing to unpickle it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise UnsafeFileError(f"{path}: refused, it needs code execution to load ({reason})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: unreadable torch checkpoint ({error})") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry")
    state = payload["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    # Checkpoints saved from DistributedDataParallel carry a "module." prefix; the release strips it.
    return OrderedDict((k.removeprefix("module."), v.contiguous()) for k, v in state.items())


def _safe_load_tensor_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays and torch tensors (plus containers); refuses every other global."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        # torch pickles a storage as bytes of a nested torch file; load that one safely too.
        ("torch.storage", "_load_from_bytes"): _safe_load_tensor_bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        # numpy 1.x writes numpy.core.multiarray, numpy 2.x numpy._core.multiarray.
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(np.core.multiarray, name)
        raise UnsafeFileError(
            f"refused to load global {module}.{name}: only arrays, tensors and containers are allowed")


def load_embeddings_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    """Read the official ``cc3m_embeddings_urls.npy`` pickle: (urls, ``[N, D] float32`` raw embeddings)."""
    with open(path, "rb") as handle:
        head = handle.read(6)
        if head == b"\x93NUMPY":
            raise CheckpointError(f"{path}: a NumPy array file, but the official format is a pickled dict "
                                  "{'paths': [...], 'embeddings': [...]}")
        handle.seek(0)
        try:
            payload = _ArrayUnpickler(handle).load()
        except UnsafeFileError as error:
            raise UnsafeFileError(f"{path}: {error}") from error
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: not a readable embeddings pickle ({error})") from error
    if not isinstance(payload, dict) or "paths" not in payload or "embeddings" not in payload:
        raise CheckpointError(f"{path}: expected a dict with 'paths' and 'embeddings'")
    paths, vectors = payload["paths"], payload["embeddings"]
    if not all(isinstance(p, str) for p in paths):
        raise CheckpointError(f"{path}: 'paths' must be a list of strings")
    rows = [v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32) for v in vectors]
    if len(rows) != len(paths):
        raise CheckpointError(f"{path}: {len(paths)} paths but {len(rows)} embeddings")
    if not rows:
        raise CheckpointError(f"{path}: no embeddings")
    matrix = np.stack([r.reshape(-1) for r in rows]).astype(np.float32)
    if not np.isfinite(matrix).all():
        raise CheckpointError(f"{path}: embeddings contain NaN or infinity")
    return list(paths), matrix


def convert_adapters(source: Path, target: Path) -> None:
    from gill.checkpoint import check_adapter_state
    from gill.config import MODEL_ARGS_FILE, GILLArgs

    args_file = source.parent / MODEL_ARGS_FILE
    args = GILLArgs.load(args_file) if args_file.exists() else GILLArgs()
    state = _torch_state_dict(source)
    check_adapter_state(state, args, str(source))
    # One metadata entry: safetensors writes several in hash-map order, and the same weights must give the same
    # bytes (SHA256SUMS of a rebuilt tiny checkpoint). The source is pretrained_ckpt.pth.tar, the format says it.
    save_file(dict(state), str(target), metadata={"format": "gill-adapters-v1"})


def convert_decision(source: Path, target: Path) -> None:
    state = _torch_state_dict(source)
    if set(state) != {"1.weight", "1.bias"} or state["1.weight"].shape[0] != 2:
        raise CheckpointError(f"{source}: expected the decision head keys 1.weight [2, D] and 1.bias [2], "
                              f"got {[(k, tuple(v.shape)) for k, v in state.items()]}")
    save_file({k: v.float() for k, v in state.items()}, str(target), metadata={"source": source.name})


def convert_embeddings(source: Path, target: Path) -> None:
    urls, matrix = load_embeddings_pickle(source)
    np.savez(target, embeddings=matrix, urls=np.array(urls, dtype=np.str_))


def convert_directory(directory: str | Path, overwrite: bool = True, checksums: bool = True) -> list[Path]:
    """Convert every official file found in ``directory``; returns the files written. With ``checksums``, their
    sha256s go into the directory's ``SHA256SUMS`` (a whole one is written where there is none yet)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    jobs = [(directory / OFFICIAL_ADAPTERS, directory / ADAPTERS_FILE, convert_adapters),
            (directory / OFFICIAL_DECISION, directory / DECISION_FILE, convert_decision)]
    embedding_files = sorted(directory.glob(OFFICIAL_EMBEDDINGS_GLOB))
    if len(embedding_files) > 1:
        raise CheckpointError(f"{directory}: several embeddings files {[p.name for p in embedding_files]}; keep one")
    if embedding_files:
        jobs.append((embedding_files[0], directory / EMBEDDINGS_FILE, convert_embeddings))
    written = []
    for source, target, convert in jobs:
        if not source.exists() or (target.exists() and not overwrite):
            continue
        partial = target.with_name(target.name + ".partial" + target.suffix)
        convert(source, partial)
        partial.replace(target)
        written.append(target)
    if not written and not (directory / ADAPTERS_FILE).exists():
        raise CheckpointError(f"{directory}: no official files to convert (expected {OFFICIAL_ADAPTERS}, "
                              f"{OFFICIAL_DECISION}, {OFFICIAL_EMBEDDINGS_GLOB})")
    if checksums and written:
        from gill.integrity import update_checksums

        update_checksums(directory, written)
    return written
