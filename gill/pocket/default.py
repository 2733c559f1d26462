"""Where the committed pocket checkpoint lives: the default of ``gill run`` and ``gill serve``."""

from __future__ import annotations

from pathlib import Path

from gill.errors import CheckpointError

POCKET_DIR = Path(__file__).resolve().parent.parent / "data" / "pocket"


def pocket_checkpoint() -> Path:
    """The pocket checkpoint shipped in the package (``gill/data/pocket``, built by ``gill make-pocket``)."""
    if not (POCKET_DIR / "model_args.json").is_file():
        raise CheckpointError(f"{POCKET_DIR}: the pocket checkpoint is missing from this installation; rebuild it "
                              f"with `gill make-pocket {POCKET_DIR}` (about 15 minutes on 2 cores) or pass "
                              "--checkpoint DIR (`gill make-tiny DIR` builds a random one in seconds)")
    return POCKET_DIR
