"""Shared fixtures: one tiny checkpoint and one loaded pipeline per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gill.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("gill-tiny"), seed=0)


@pytest.fixture(scope="session")
def pipeline(tiny_dir: Path):
    from gill.pipeline import Pipeline

    return Pipeline.from_checkpoint(tiny_dir, device="cpu")


@pytest.fixture
def decision_bias(pipeline):
    """Force the decision head towards one class for a test, restoring it afterwards."""
    head = pipeline.components.model.decision_head
    saved = head[1].bias.detach().clone()

    def force(choice: str) -> None:
        with torch.no_grad():
            head[1].bias.copy_(torch.tensor([100.0, -100.0] if choice == "gen" else [-100.0, 100.0]))

    yield force
    with torch.no_grad():
        head[1].bias.copy_(saved)
