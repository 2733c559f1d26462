"""Stable Diffusion driven by GILL's ``prompt_embeds``, with cancellation and previews every step.

Two schedulers: the reference's PNDM (SD v1.5's own, 50 steps, the default so that images match the reference)
and DPM-Solver++ (``DPMSolverMultistepScheduler``, ``algorithm_type="dpmsolver++"``, built from the same
checkpoint config), which reaches comparable quality in about 20-25 steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from gill.config import GILLArgs, resolve_source
from gill.errors import InputError
from gill.options import DEFAULT_SCHEDULER, SCHEDULERS

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


@dataclass(frozen=True)
class GenerationJob:
    """One image of a (possibly batched) denoising loop, with its own seed, cancellation and callbacks.

    ``prompt_embeds`` is ``[1, 77, gen_emb_dim]``. The initial latents come from ``seed`` alone, so the image is
    the same (within float tolerance of batched kernels) whether the job runs alone or in a batch.
    ``on_step(step, total)`` sees every finished step, ``on_preview`` every ``preview_every``-th.
    """

    prompt_embeds: torch.Tensor
    seed: int | None = None
    cancel: Callable[[], bool] | None = None
    on_preview: PreviewCallback | None = None
    preview_every: int = 0
    on_step: Callable[[int, int], None] | None = None


class ImageGenerator:
    """Wraps a diffusers ``StableDiffusionPipeline``; only ever called when the decision is "generate".

    Safe to call from several threads (the served ``diffusion`` model runs each request on its own): one
    denoising loop (of one image or a batch) runs at a time.
    """

    def __init__(self, pipe) -> None:
        from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe  # the checkpoint's pipeline (SD v1.5's has PNDM); its modules are shared with self._pipes
        config = pipe.scheduler.config
        # One pipeline per scheduler, sharing every module: a scheduler holds per-loop state (timesteps, step
        # index, PNDM's past outputs, DPM-Solver's model outputs), reset by set_timesteps at each call.
        pndm = pipe.scheduler if isinstance(pipe.scheduler, PNDMScheduler) else PNDMScheduler.from_config(config)
        dpm = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
        self._pipes = {name: pipe if scheduler is pipe.scheduler else type(pipe)(
            **{**pipe.components, "scheduler": scheduler}, requires_safety_checker=pipe.config.requires_safety_checker)
            for name, scheduler in (("pndm", pndm), ("dpm++", dpm))}
        for each in self._pipes.values():
            each.set_progress_bar_config(disable=True)
        # A diffusers pipeline call is not reentrant: the scheduler's timesteps and step index, and the
        # pipeline's _interrupt and _guidance_scale, live on the shared objects. Two requests denoising at once
        # corrupt each other's images (or fail with an IndexError in the scheduler), and one request's cancel
        # would stop the other. Batch requests instead (generate_batch).
        self._lock = threading.Lock()
        self._negative: torch.Tensor | None = None
        self.steps_run = 0  # denoising loop steps executed (a batch's step counts once), for tests and metrics

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

    def planned_steps(self, num_inference_steps: int, scheduler: str = DEFAULT_SCHEDULER) -> int:
        """UNet evaluations a loop of ``num_inference_steps`` runs: PNDM (skip_prk_steps) plans one extra."""
        template = self._scheduler_pipe(scheduler).scheduler
        probe = type(template).from_config(template.config)
        probe.set_timesteps(num_inference_steps)
        return len(probe.timesteps)

    def _scheduler_pipe(self, scheduler: str):
        if scheduler not in self._pipes:
            raise InputError(f"unknown scheduler {scheduler!r} (allowed: {', '.join(SCHEDULERS)})")
        return self._pipes[scheduler]

    def _negative_embeddings(self) -> torch.Tensor:
        # The reference passes no negative prompt, so diffusers' CFG encodes "": do that once, not per image.
        if self._negative is None:
            _, self._negative = self.pipe.encode_prompt("", self.device, 1, True)
        return self._negative

    def generate(self, prompt_embeds: torch.Tensor, *, scheduler: str = DEFAULT_SCHEDULER,
                 guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 seed: int | None = None, cancel: Callable[[], bool] | None = None,
                 on_preview: PreviewCallback | None = None, preview_every: int = 0,
                 on_step: Callable[[int, int], None] | None = None) -> Image.Image | None:
        """``[1, 77, gen_emb_dim]`` prompt embeddings -> an image, or None when cancelled.

        ``cancel`` is checked after every denoising step; the loop stops there and the VAE never runs.
        ``on_step(step, total)`` sees every finished step, ``on_preview`` every ``preview_every``-th.
        ``scheduler`` is ``"pndm"`` (the reference's) or ``"dpm++"`` (DPM-Solver++, fewer steps).
        """
        job = GenerationJob(prompt_embeds, seed, cancel, on_preview, preview_every, on_step)
        return self.generate_batch([job], scheduler=scheduler, guidance_scale=guidance_scale,
                                   num_inference_steps=num_inference_steps)[0]

    @torch.inference_mode()
    def generate_batch(self, jobs: Sequence[GenerationJob], *, scheduler: str = DEFAULT_SCHEDULER,
                       guidance_scale: float = 7.5, num_inference_steps: int = 50) -> list[Image.Image | None]:
        """Denoise ``jobs`` together in one loop (one UNet call of batch ``2 * len(jobs)`` per step with
        guidance); returns one image per job, None for a cancelled one.

        A cancelled job gets no more callbacks and no image, but its row stays in the batch (the schedulers
        keep per-batch state); the loop stops early only once every job is cancelled.
        """
        if not jobs:
            return []
        pipe = self._scheduler_pipe(scheduler)
        cancelled = [False] * len(jobs)

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            self.steps_run += 1
            total = len(pipe.scheduler.timesteps)
            for row, job in enumerate(jobs):
                if cancelled[row]:
                    continue
                if job.on_step is not None:
                    job.on_step(step + 1, total)
                if job.cancel is not None and job.cancel():
                    cancelled[row] = True
                elif job.on_preview is not None and job.preview_every and (step + 1) % job.preview_every == 0:
                    job.on_preview(step + 1, total, latents_to_preview(tensors["latents"][row:row + 1]))
            if all(cancelled):
                pipe._interrupt = True
            return {}

        # A generator per job: diffusers draws each row's initial noise from its own generator, exactly the
        # draw of that job alone. An unseeded job takes its seed from torch's global generator.
        seeds = [job.seed if job.seed is not None else int(torch.randint(0, 2**62, ())) for job in jobs]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        with self._lock:
            embeds = torch.cat([job.prompt_embeds.reshape(1, *job.prompt_embeds.shape[-2:])
                                .to(self.device, self.pipe.unet.dtype) for job in jobs])
            negative = None
            if guidance_scale > 1:
                negative = self._negative_embeddings().to(embeds.dtype).expand(len(jobs), -1, -1)
            latents = pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, generator=generators, output_type="latent",
                callback_on_step_end=on_step_end).images
            keep = [row for row in range(len(jobs)) if not cancelled[row]]
            images: list[Image.Image | None] = [None] * len(jobs)
            if keep:
                for row, image in zip(keep, self._decode(latents[keep]), strict=True):
                    images[row] = image
            return images

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        if self.pipe.safety_checker is not None:
            pixels, _ = self.pipe.run_safety_checker(pixels, self.device, latents.dtype)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")


@dataclass(frozen=True)
class LoopSettings:
    """What requests must share to denoise in one loop."""

    scheduler: str = DEFAULT_SCHEDULER
    num_inference_steps: int = 50
    guidance_scale: float = 7.5


@dataclass(eq=False)
class _Waiting:
    job: GenerationJob
    settings: LoopSettings
    done: threading.Event = field(default_factory=threading.Event)
    # Set once the caller gave up (cancelled): the loop then calls none of its callbacks, which may no longer send.
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    image: Image.Image | None = None
    error: BaseException | None = None

    def guarded(self) -> GenerationJob:
        """The job, with callbacks that do nothing once the caller has left."""

        def guard(callback: Callable | None) -> Callable | None:
            if callback is None:
                return None

            def call(*args) -> None:
                with self.lock:
                    if not self.abandoned:
                        callback(*args)
            return call

        cancel = self.job.cancel
        return replace(self.job, on_step=guard(self.job.on_step), on_preview=guard(self.job.on_preview),
                       cancel=lambda: self.abandoned or (cancel is not None and cancel()))


class DiffusionBatcher:
    """Dynamic batching for a server: concurrent requests with equal :class:`LoopSettings` denoise together.

    Callers block in :meth:`generate` from their own threads; one worker thread runs the loops. Requests that
    arrive while a loop runs, or within ``window_s`` of the oldest waiting one, join the next loop of their
    settings, at most ``max_batch`` per loop, oldest first. A cancelled request returns None at once (within
    ``POLL_S``): it leaves the queue, or, inside a loop, gets no more callbacks while the loop goes on for the
    others (see :meth:`ImageGenerator.generate_batch`).
    """

    POLL_S = 0.05

    def __init__(self, generator: ImageGenerator, max_batch: int = 4, window_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, got {max_batch} and {window_s}")
        self.generator, self.max_batch, self.window_s = generator, max_batch, window_s
        self.on_batch = on_batch  # sees each loop's batch size, for metrics and tests
        self._waiting: list[_Waiting] = []
        self._condition = threading.Condition()
        threading.Thread(target=self._run, name="gill-denoise-loop", daemon=True).start()

    def generate(self, job: GenerationJob, settings: LoopSettings = LoopSettings()) -> Image.Image | None:
        """The job's image, or None when it was cancelled; raises what its loop raised."""
        entry = _Waiting(job, settings)
        with self._condition:
            self._waiting.append(entry)
            self._condition.notify_all()
        while not entry.done.wait(self.POLL_S):
            if job.cancel is not None and job.cancel():
                with entry.lock:  # a callback running now finishes first; none runs after
                    entry.abandoned = True
                with self._condition:
                    if entry in self._waiting:
                        self._waiting.remove(entry)
                return None
        if entry.error is not None:
            raise entry.error
        return entry.image

    def _next_batch(self) -> list[_Waiting]:
        with self._condition:
            deadline = None
            while True:
                if not self._waiting:  # (the oldest may have been cancelled while it waited)
                    deadline = None
                    self._condition.wait()
                    continue
                if deadline is None:
                    deadline = time.monotonic() + self.window_s
                settings = self._waiting[0].settings
                batch = [entry for entry in self._waiting if entry.settings == settings][:self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) == self.max_batch or left <= 0:
                    break
                self._condition.wait(left)
            for entry in batch:
                self._waiting.remove(entry)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            settings = batch[0].settings
            try:
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                images = self.generator.generate_batch(
                    [entry.guarded() for entry in batch], scheduler=settings.scheduler,
                    num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale)
                for entry, image in zip(batch, images, strict=True):
                    entry.image = image
            except BaseException as error:  # noqa: BLE001 - every waiting caller gets it; the worker lives on
                for entry in batch:
                    entry.error = error
            finally:
                for entry in batch:
                    entry.done.set()
