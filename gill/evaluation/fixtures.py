"""Random-weight stand-ins for the metric models, built offline, so every eval command runs in CI.

Their scores exercise the code paths and the known-value checks; they are not comparable to the paper's
(the result JSON records the files' sha256, and a random AlexNet is flagged as not torchvision's ImageNet one).
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random full ``CLIPModel`` (text and vision towers, projections) and its image processor, saved
    as ``openai/clip-vit-large-patch14`` is laid out, so :meth:`ClipSimilarity.from_directory` loads it the
    same way. Image size 32, patch 8, projection 16."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 62,
                     "eos_token_id": 63, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def make_random_alexnet(path: str | Path, seed: int = 0) -> Path:
    """torchvision's AlexNet with random weights, saved as its ImageNet state dict is (``features.*``,
    ``classifier.*``), for :meth:`Lpips.from_alexnet` in tests."""
    from torchvision.models import alexnet

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(alexnet(weights=None).state_dict(), path)
    return path
