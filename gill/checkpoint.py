"""The checkpoint directory: which file holds what, and loading the adapters with shape checks.

A checkpoint directory (the real one after ``gill download`` + ``gill convert``, or a ``gill make-tiny`` one)::

    model_args.json                 architecture and base-model sources (hub ids or paths relative to here)
    gill_adapters.safetensors       the trainable modules, official keys (``model.visual_fc.weight`` ...)
    decision_model.safetensors      retrieve-or-generate head (``1.weight`` [2, D], ``1.bias`` [2])
    retrieval_embeddings.npz        optional: ``embeddings`` [N, 256] float32 (raw) and ``urls`` [N]
    pretrained_ckpt.pth.tar ...     the official pickles, kept only as conversion inputs; never read at serve time
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gill.adapters import ADAPTER_KEY_PREFIX, GILLAdapters, make_decision_head
from gill.config import GILLArgs
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


def load_adapters(directory: Path, args: GILLArgs, lm_width: int, vision_width: int) -> GILLAdapters:
    """The adapters, checked against ``args`` and the base models' widths, in float32 on the CPU."""
    path = directory / ADAPTERS_FILE
    state = _read_safetensors(path)
    widths = check_adapter_state(state, args, str(path))
    if widths != (lm_width, vision_width):
        raise CheckpointError(f"{path}: adapters were trained for LM width {widths[0]} and vision width {widths[1]}, "
                              f"but the base models have {lm_width} and {vision_width}; check opt_version "
                              "and visual_encoder in model_args.json")
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
    if "1.weight" not in state or tuple(state["1.weight"].shape) != (2, lm_width):
        raise CheckpointError(f"{path}: expected 1.weight of shape (2, {lm_width}) for this LM; "
                              f"got {[(k, tuple(v.shape)) for k, v in state.items()]}")
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
