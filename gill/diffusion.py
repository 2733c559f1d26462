"""Stable Diffusion driven by GILL's ``prompt_embeds``, with cancellation and previews every step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from gill.config import GILLArgs, resolve_source

# Linear map from SD v1.x latents to approximate RGB, for previews without running the VAE decoder
# (the widely used community approximation of the v1 latent space).
_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                            [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])

PreviewCallback = Callable[[int, int, Image.Image], None]


def latents_to_preview(latents: torch.Tensor) -> Image.Image:
    """``[1, 4, h, w]`` latents -> an ``h x w`` RGB preview (1/8 of the output size for SD v1.5)."""
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), _LATENT_RGB)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")


class ImageGenerator:
    """Wraps a diffusers ``StableDiffusionPipeline``; only ever called when the decision is "generate".

    Safe to call from several threads (the served ``diffusion`` model runs each request on its own): one image
    is denoised at a time.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        # A diffusers pipeline call is not reentrant: the scheduler's timesteps and step index, and the
        # pipeline's _interrupt and _guidance_scale, live on the shared objects. Two requests denoising at once
        # corrupt each other's images (or fail with an IndexError in the scheduler), and one request's cancel
        # would stop the other.
        self._lock = threading.Lock()
        self._negative: torch.Tensor | None = None
        self.steps_run = 0  # denoising steps executed, for tests and metrics

    @classmethod
    def from_checkpoint(cls, args: GILLArgs, directory, device: torch.device, dtype: torch.dtype,
                        safety_checker: bool = False) -> ImageGenerator:
        from diffusers import StableDiffusionPipeline

        # fp16 on the GPU as the reference; the safety checker (black images for flagged outputs) is opt-in.
        extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        source = resolve_source(args.sd_version, directory)
        # `gill download` fetches only the fp16 weight files; from_pretrained must be told to look for them.
        fp16_only = (Path(source) / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists() and not (
            Path(source) / "unet" / "diffusion_pytorch_model.safetensors").exists()
        if fp16_only:
            extra["variant"] = "fp16"
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=torch.float16 if device.type == "cuda" else dtype, **extra)
        return cls(pipe.to(device))

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _negative_embeddings(self) -> torch.Tensor:
        # The reference passes no negative prompt, so diffusers' CFG encodes "": do that once, not per image.
        if self._negative is None:
            _, self._negative = self.pipe.encode_prompt("", self.device, 1, True)
        return self._negative

    @torch.inference_mode()
    def generate(self, prompt_embeds: torch.Tensor, *, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 seed: int | None = None, cancel: Callable[[], bool] | None = None,
                 on_preview: PreviewCallback | None = None, preview_every: int = 0,
                 on_step: Callable[[int, int], None] | None = None) -> Image.Image | None:
        """``[1, 77, gen_emb_dim]`` prompt embeddings -> an image, or None when cancelled.

        ``cancel`` is checked after every denoising step; the loop stops there and the VAE never runs.
        ``on_step(step, total)`` sees every finished step, ``on_preview`` every ``preview_every``-th.
        """
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        cancelled = False

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            nonlocal cancelled
            self.steps_run += 1
            if on_step is not None:
                on_step(step + 1, len(pipe.scheduler.timesteps))
            if cancel is not None and cancel():
                cancelled = True
                pipe._interrupt = True
            elif on_preview is not None and preview_every and (step + 1) % preview_every == 0:
                on_preview(step + 1, len(pipe.scheduler.timesteps), latents_to_preview(tensors["latents"]))
            return {}

        with self._lock:
            embeds = prompt_embeds.to(self.device, self.pipe.unet.dtype)
            negative = self._negative_embeddings().to(embeds.dtype) if guidance_scale > 1 else None
            latents = self.pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, generator=generator, output_type="latent",
                callback_on_step_end=on_step_end).images
            if cancelled:
                return None
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        if self.pipe.safety_checker is not None:
            pixels, _ = self.pipe.run_safety_checker(pixels, self.device, latents.dtype)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")[0]
