"""The pocket model's Stable Diffusion: a VAE and a text-conditioned UNet trained from scratch on the CPU.

It plays Stable Diffusion v1.5's part: a frozen text-to-image model whose text encoder is CLIP's text tower. The
text tower is given (trained elsewhere, on the shapes world's captions) and stays frozen, exactly as SD v1.5 froze
CLIP's; this module trains what SD trained itself, on jittered renders of the world's training scenes only:

1. the VAE (``AutoencoderKL``, two blocks: a 32 x 32 RGB image <-> ``[4, 16, 16]`` latents), on reconstruction and a
   small KL term, then ``scaling_factor`` = 1 / std of its latents, as SD's 0.18215 was chosen;
2. the UNet (``UNet2DConditionModel``), on epsilon prediction under SD v1.5's training noise schedule (scaled-linear
   betas 0.00085..0.012, 1000 steps), cross-attending to the text tower's ``last_hidden_state`` of the caption
   padded to 77 tokens, the empty prompt in place of the caption one time in ten (for classifier-free guidance).

The result is saved as a ``StableDiffusionPipeline`` directory in the layout of :func:`gill.tiny._build_sd` (with SD
v1.5's PNDM scheduler configuration), which :mod:`gill.diffusion` loads unchanged.

Usage::

    build_diffusion(Path("pocket/sd"), text_encoder, tokenizer, World(seed=0), DiffusionConfig(), seed=0)
    evaluate_diffusion(Path("pocket/sd"), World(seed=0), scheduler="dpm++", steps=20)
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from gill.pocket.world import Scene, World

# SD v1.5's noise schedule, shared by the training DDPM scheduler and the saved PNDM one.
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
# SD's latents have 4 channels; gill.diffusion's previews map exactly 4 to RGB.
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class DiffusionConfig:
    """Sizes and budget of the pocket VAE and UNet; the defaults build in about 6 minutes on two CPU cores."""

    # VAE: two blocks halve 32 x 32 once (-> 16 x 16 latents); its mid-block attention is dropped (flat colours
    # need no global mixing to be reconstructed, and it is a large share of the compute at this size).
    vae_channels: tuple[int, ...] = (16, 32)
    vae_layers_per_block: int = 1
    vae_steps: int = 300
    vae_batch_size: int = 16
    vae_lr: float = 4e-3
    # Weight of the KL term per latent element against the MSE per pixel element: small, as SD's 1e-6, so latents
    # keep the detail of the image; enough to keep them near zero mean and unit-ish scale, and the decoder used to
    # slightly noisy latents (which is what a sampler hands it).
    kl_weight: float = 1e-6
    # UNet: 16 x 16 -> 8 x 8 -> 4 x 4. Cross-attention only on the coarser two (and the mid block): the caption says
    # what colours and which shape, which are decided coarsely; attention at 16 x 16 would double the cost.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 8
    # Also pool the caption into the timestep embedding (diffusers' ``addition_embed_type="text"``), so colours
    # reach every ResNet block; the pipeline passes only ``encoder_hidden_states``, which is all this needs.
    text_time_embedding: bool = False
    # Latents of this many jittered renders are encoded once and reused by every UNet step.
    latent_pool: int = 4096
    unet_steps: int = 1200
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 50
    # Loss weights, in terms of the error of the predicted clean latents (epsilon MSE x SNR): min(SNR, snr_gamma)
    # as Min-SNR-gamma (Hang et al. 2023), which converges several times faster than the plain loss, but never under
    # ``snr_floor``. The plain epsilon loss weighs a high-noise step's x0 error by its tiny SNR (0.005 at t = 999),
    # yet those steps decide the colours of the whole image: without the floor the caption is learnt far slower.
    snr_gamma: float = 5.0
    snr_floor: float = 0.1
    # "Offset noise": each latent channel's noise also gets one shared offset of this std (training only; sampling
    # starts from plain noise). Under SD's schedule the first sampling step still holds 7% of the signal, so the
    # mean of the noise reads as the background colour as loudly as the caption does; with the offset the model
    # learns not to trust it, and takes the colours from the caption.
    offset_noise: float = 0.1
    # The empty prompt instead of the caption this often, so classifier-free guidance has an unconditional model.
    condition_dropout: float = 0.1
    # Exponential moving average of the UNet's weights (what is saved): smooths the last steps' noise.
    ema_decay: float = 0.995

    def quick(self) -> DiffusionConfig:
        """A few steps of small models of the same layout, for tests of the build."""
        return replace(self, vae_channels=(8, 16), vae_steps=4, vae_batch_size=4, unet_channels=(8, 16, 16),
                       attention_heads=2, latent_pool=16, unet_steps=4, unet_batch_size=4, warmup_steps=1)


def _groups(channels: Sequence[int]) -> int:
    """The largest GroupNorm group count (at most 8) that divides every block's channels."""
    return max(g for g in range(1, 9) if all(c % g == 0 for c in channels))


def _to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> ``[N, 3, H, W]`` float in -1..1 (SD's pixel range)."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def text_states(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """``[N, 77, width]`` states of ``captions`` exactly as ``StableDiffusionPipeline.encode_prompt`` computes
    them: padded to the tokenizer's 77 positions and encoded without an attention mask."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state.float()


def _train_vae(world: World, config: DiffusionConfig, rng: random.Random, progress: bool):
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=config.vae_layers_per_block, norm_num_groups=_groups(config.vae_channels),
        sample_size=world.size, mid_block_add_attention=False)
    vae.train()
    # fused: one kernel for every parameter; on these small models the per-tensor loop is a sixth of a step.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0, fused=True)
    schedule = _cosine(optimizer, config.warmup_steps, config.vae_steps)
    noise = torch.Generator().manual_seed(rng.randrange(2**62))
    recent: list[tuple[float, float]] = []
    bar = tqdm(range(config.vae_steps), desc="pocket VAE", disable=not progress)
    for _ in bar:
        scenes = [rng.choice(world.train_scenes) for _ in range(config.vae_batch_size)]
        pixels = _to_tensor([world.render(scene, rng) for scene in scenes])
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise)
        reconstruction = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / latents[0].numel()
        loss = mse + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [(mse.item(), kl.item())])[-50:]
        bar.set_postfix(mse=f"{recent[-1][0]:.4f}")
    vae.eval().requires_grad_(False)
    return vae, float(np.mean([m for m, _ in recent])), float(np.mean([k for _, k in recent]))


def _cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_diffusion(directory: Path, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, world: World,
                    config: DiffusionConfig, seed: int, progress: bool = True) -> dict[str, float]:
    """Train the VAE, then the UNet on ``text_encoder``'s states of the world's captions, and save the
    pipeline (``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``) to ``directory``.

    Only ``world.train_scenes`` are rendered; captions are full or short as :meth:`World.caption` picks. The same
    ``seed`` gives the same weights (on the same machine and thread count). Returns the final losses (means of the
    last 50 steps): ``vae_mse`` (per pixel element, pixels in -1..1), ``vae_kl`` (per latent element),
    ``scaling_factor``, ``latent_mean`` (of the scaled latents) and ``unet_loss`` (epsilon MSE, SNR-weighted).
    """
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tqdm.auto import tqdm

    rng = random.Random(f"diffusion-{seed}")
    torch.manual_seed(seed)
    text_encoder = text_encoder.eval().requires_grad_(False)
    vae, vae_mse, vae_kl = _train_vae(world, config, rng, progress)

    # The UNet's data: latents of a pool of jittered renders (the VAE is frozen from here), each drawn afresh from
    # its posterior at every use as SD does, and the text states of every distinct caption (the encoder is frozen).
    scenes = [rng.choice(world.train_scenes) for _ in range(config.latent_pool)]
    with torch.no_grad():
        posteriors = [vae.encode(_to_tensor([world.render(s, rng) for s in scenes[i:i + 256]])).latent_dist
                      for i in range(0, len(scenes), 256)]
    means = torch.cat([p.mean for p in posteriors])
    stds = torch.cat([p.std for p in posteriors])
    # Like SD's 0.18215: scaled latents have unit variance, the scale the noise schedule was designed for.
    scaling_factor = 1.0 / float(means.std())
    captions = sorted({caption for scene in world.train_scenes for caption in (scene.caption, scene.short_caption)})
    states = text_states(text_encoder, tokenizer, [""] + captions)  # row 0: the empty prompt
    caption_row = {caption: row + 1 for row, caption in enumerate(captions)}

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_cross_attention))
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if config.text_time_embedding else {}
    unet = UNet2DConditionModel(
        sample_size=world.size // 2 ** (len(config.vae_channels) - 1), in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, layers_per_block=config.layers_per_block,
        block_out_channels=config.unet_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=config.attention_heads,
        norm_num_groups=_groups(config.unet_channels), **extra)
    average = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    ddpm = DDPMScheduler(**_BETAS)
    alphas = ddpm.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01, fused=True)
    parameters, averages = list(unet.parameters()), list(average.parameters())
    schedule = _cosine(optimizer, config.warmup_steps, config.unet_steps)
    noise = torch.Generator().manual_seed(rng.randrange(2**62))
    recent: list[float] = []
    bar = tqdm(range(config.unet_steps), desc="pocket UNet", disable=not progress)
    for step in bar:
        rows = torch.randint(0, len(scenes), (config.unet_batch_size,), generator=noise)
        latents = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=noise)) * scaling_factor
        conditions = [0 if rng.random() < config.condition_dropout else
                      caption_row[world.caption(scenes[row], rng)] for row in rows.tolist()]
        epsilon = torch.randn(latents.shape, generator=noise)
        epsilon += config.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=noise)
        timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (len(rows),), generator=noise)
        noisy = ddpm.add_noise(latents, epsilon, timesteps)
        predicted = unet(noisy, timesteps, states[conditions]).sample
        errors = (predicted - epsilon).pow(2).mean(dim=(1, 2, 3))
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        errors = errors * torch.clamp(snr, config.snr_floor, config.snr_gamma) / snr
        loss = errors.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        # EMA with a warmup (the early average would otherwise be dominated by the random initialisation).
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averages, parameters, 1 - decay)
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{recent[-1]:.4f}")

    vae.register_to_config(scaling_factor=scaling_factor)
    scheduler = PNDMScheduler(**_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=average.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return {"vae_mse": vae_mse, "vae_kl": vae_kl, "scaling_factor": scaling_factor,
            "latent_mean": float(means.mean()) * scaling_factor, "unet_loss": float(np.mean(recent))}


def evaluate_diffusion(directory: Path, world: World, prompts: Sequence[Scene] | None = None, steps: int = 50,
                       scheduler: str = "pndm", guidance_scale: float = 7.5, seed: int = 0,
                       batch_size: int = 16) -> dict[str, float]:
    """Generate one image per scene of ``prompts`` (default: every held-out scene and as many training scenes)
    from the text states of its full caption, through :class:`gill.diffusion.ImageGenerator` as served, and judge
    each (:func:`gill.pocket.judge.judge`). Returns the fractions right: ``colour``, ``background``, ``shape``,
    and ``count``."""
    from gill.config import GILLArgs
    from gill.diffusion import GenerationJob, ImageGenerator
    from gill.pocket.judge import judge

    if prompts is None:
        chosen = random.Random(seed).sample(world.train_scenes, len(world.heldout_scenes))
        prompts = world.heldout_scenes + chosen
    generator = ImageGenerator.from_checkpoint(GILLArgs(sd_version=str(directory)), None, torch.device("cpu"),
                                               torch.float32)
    pipe = generator.pipe
    right: Counter[str] = Counter()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        embeds = text_states(pipe.text_encoder, pipe.tokenizer, [scene.caption for scene in batch])
        jobs = [GenerationJob(embeds[row:row + 1], seed=seed * 1000 + start + row) for row in range(len(batch))]
        images = generator.generate_batch(jobs, scheduler=scheduler, guidance_scale=guidance_scale,
                                          num_inference_steps=steps)
        for scene, image in zip(batch, images, strict=True):
            verdict = judge(image)
            right["colour"] += verdict.colour == scene.colour
            right["background"] += verdict.background == scene.background
            right["shape"] += verdict.shape == scene.shape
    return {key: right[key] / len(prompts) for key in ("colour", "background", "shape")} | {"count": len(prompts)}
