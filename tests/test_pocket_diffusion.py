"""The pocket Stable Diffusion build (gill.pocket.diffusion): a quick build loads and denoises as served, repeatably."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from gill.config import GILLArgs
from gill.diffusion import ImageGenerator
from gill.pocket.clip import char_tokenizer
from gill.pocket.diffusion import DiffusionConfig, build_diffusion, text_states
from gill.pocket.world import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingWorld(World):
    """A world that remembers every scene it rendered."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.rendered: set = set()

    def render(self, scene, rng=None):
        self.rendered.add(scene)
        return super().render(scene, rng)


def text_encoder() -> CLIPTextModel:
    """A random text tower of the pocket CLIP's shape (the trained one is built elsewhere)."""
    torch.manual_seed(7)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()


def test_quick_build_loads_as_served_denoises_to_32_pixels_and_repeats(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tokenizer")
    world = RecordingWorld(0)
    config = DiffusionConfig().quick()
    losses = build_diffusion(tmp_path / "sd", text_encoder(), tokenizer, world, config, seed=0, progress=False)
    again = build_diffusion(tmp_path / "again", text_encoder(), tokenizer, World(0), config, seed=0, progress=False)

    assert set(losses) == {"vae_mse", "vae_kl", "scaling_factor", "latent_mean", "unet_loss"}
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert losses == again
    for part in ("unet", "vae"):
        first = load_file(tmp_path / "sd" / part / "diffusion_pytorch_model.safetensors")
        second = load_file(tmp_path / "again" / part / "diffusion_pytorch_model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert world.rendered and not world.rendered & set(world.heldout_scenes)  # never a held-out scene

    vae_config = json.loads((tmp_path / "sd" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(losses["scaling_factor"])
    scheduler = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["skip_prk_steps"]) == (0.00085, 0.012, True)

    generator = ImageGenerator.from_checkpoint(GILLArgs(sd_version=str(tmp_path / "sd")), None,
                                               torch.device("cpu"), torch.float32)
    embeds = text_states(generator.pipe.text_encoder, generator.pipe.tokenizer, ["a red circle on a blue background"])
    assert embeds.shape == (1, 77, 64)
    for name in ("pndm", "dpm++"):
        image = generator.generate(embeds, scheduler=name, num_inference_steps=3, seed=1)
        assert image.size == (32, 32) and image.mode == "RGB"
