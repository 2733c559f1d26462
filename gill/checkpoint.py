"""The checkpoint directory: which file holds what, and loading the adapters with shape checks.

A checkpoint directory (the real one after ``gill download`` + ``gill convert``, or a ``gill make-tiny`` one)::

    model_args.json                 architecture and base-model sources (hub ids or paths relative to here)
    gill_adapters.safetensors       the trainable modules, official keys (``model.visual_fc.weight`` ...)
    decision_model.safetensors      retrieve-or-generate head (``1.weight`` [2, D], ``1.bias`` [2])
    retrieval_embeddings.npz        optional: ``embeddings`` [N, 256] float32 (raw) and ``urls`` [N]
    SHA256SUMS                      sha256 of every file, checked before serving (gill.integrity)
    pretrained_ckpt.pth.tar ...     the official pickles, kept only as conversion inputs; never read at serve time
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gill.adapters import ADAPTER_KEY_PREFIX, GILLAdapters, make_decision_head
from gill.config import GILLArgs, resolve_source
from gill.convert import ADAPTERS_FILE, DECISION_FILE
from gill.errors import CheckpointError

_LM_WIDTH_KEY = ADAPTER_KEY_PREFIX + "ret_text_hidden_fcs.0.model.weight"  # [ret_emb_dim, lm_width]
_VISION_WIDTH_KEY = ADAPTER_KEY_PREFIX + "visual_fc.weight"  # [ret_emb_dim, vision_width]


def adapter_widths(state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(lm_width, vision_width) as the adapter tensors imply them."""
    for key in (_LM_WIDTH_KEY, _VISION_WIDTH_KEY):
        if key not in state or state[key].ndim != 2:
            raise CheckpointError(f"{source}: missing or malformed {key}; is this a GILL adapter checkpoint?")
    return state[_LM_WIDTH_KEY].shape[1], state[_VISION_WIDTH_KEY].shape[1]


def check_adapter_state(state: dict[str, torch.Tensor], args: GILLArgs, source: str) -> tuple[int, int]:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped key."""
    lm_width, vision_width = adapter_widths(state, source)
    with torch.device("meta"):
        expected = {ADAPTER_KEY_PREFIX + k: tuple(v.shape)
                    for k, v in GILLAdapters(args, lm_width, vision_width).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shared = sorted(set(got) & set(expected))
    wrong = [f"{k}: {got[k]} (expected {expected[k]})" for k in shared if got[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            parts.append("wrong shapes " + "; ".join(wrong[:6]))
        raise CheckpointError(f"{source}: adapter weights do not match model_args: " + ", ".join(parts))
    return lm_width, vision_width


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run `gill convert {path.parent}` on the official files "
                              "or build a checkpoint with `gill make-tiny`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from error


def _read_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (shapes only): reads the header, not the data."""
    if not path.is_file():
        _read_safetensors(path)  # raises the not-found error
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from error


def _check_widths(path: Path, widths: tuple[int, int], lm_width: int | None, vision_width: int | None) -> None:
    """The adapters' (lm_width, vision_width) against the base models'; None: not known, not checked."""
    if (lm_width is not None and widths[0] != lm_width) or (vision_width is not None and widths[1] != vision_width):
        raise CheckpointError(f"{path}: adapters were trained for LM width {widths[0]} and vision width {widths[1]}, "
                              f"but the base models have {lm_width} and {vision_width}; check opt_version "
                              "and visual_encoder in model_args.json")


def _check_decision_state(state: dict[str, torch.Tensor], lm_width: int, path: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != {"1.weight": (2, lm_width), "1.bias": (2,)}:
        raise CheckpointError(f"{path}: expected 1.weight of shape (2, {lm_width}) and 1.bias of shape (2,) for "
                              f"this LM; got {sorted(shapes.items())}")


def local_base_widths(args: GILLArgs, directory: Path) -> tuple[int | None, int | None]:
    """(lm_width, vision_width) from the base models' config files where they are folders on disk; None for a
    hub id (reading its config could mean a download; loading checks it)."""
    from transformers import AutoConfig, CLIPVisionConfig

    widths: list[int | None] = []
    for source, config_class in ((args.opt_version, AutoConfig), (args.visual_encoder, CLIPVisionConfig)):
        path = Path(resolve_source(source, directory))
        if not path.is_dir():
            widths.append(None)
            continue
        try:
            widths.append(config_class.from_pretrained(path).hidden_size)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path / 'config.json'}: unreadable base-model config ({error})") from error
    return widths[0], widths[1]


def check_shapes(directory: str | Path) -> None:
    """Raise :class:`CheckpointError`, naming the file, when ``model_args.json`` is invalid or the adapters or
    decision head do not fit it and the base models: the checks of :func:`load_adapters` and
    :func:`load_decision_head`, from safetensors headers and config files only (no weights are read)."""
    directory = Path(directory)
    args = GILLArgs.load(directory)
    path = directory / ADAPTERS_FILE
    widths = check_adapter_state(_read_shapes(path), args, str(path))
    _check_widths(path, widths, *local_base_widths(args, directory))
    decision = directory / DECISION_FILE
    if decision.exists():
        _check_decision_state(_read_shapes(decision), widths[0], decision)


def load_adapters(directory: Path, args: GILLArgs, lm_width: int, vision_width: int) -> GILLAdapters:
    """The adapters, checked against ``args`` and the base models' widths, in float32 on the CPU."""
    path = directory / ADAPTERS_FILE
    state = _read_safetensors(path)
    _check_widths(path, check_adapter_state(state, args, str(path)), lm_width, vision_width)
    adapters = GILLAdapters(args, lm_width, vision_width)
    adapters.load_state_dict({k.removeprefix(ADAPTER_KEY_PREFIX): v.float() for k, v in state.items()})
    return adapters.eval()


def load_decision_head(directory: Path, lm_width: int) -> torch.nn.Sequential | None:
    """The decision classifier, or None when the checkpoint has none (then images are generated)."""
    path = directory / DECISION_FILE
    if not path.exists():
        return None
    state = _read_safetensors(path)
    head = make_decision_head(lm_width)
    _check_decision_state(state, lm_width, path)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


def load_logit_scale(directory: Path) -> float:
    """The adapters' ``logit_scale`` alone (the retrieval service needs nothing else from them)."""
    from safetensors import safe_open

    path = Path(directory) / ADAPTERS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run `gill convert {path.parent}` first")
    with safe_open(str(path), framework="pt") as handle:
        return float(handle.get_tensor(ADAPTER_KEY_PREFIX + "logit_scale").float())
