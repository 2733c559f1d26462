"""diffusion: PROMPT_EMBEDS [1, 77, 768] -> IMAGE (PNG), with optional per-step progress and previews; concurrent
requests with equal (SCHEDULER, STEPS, GUIDANCE_SCALE) denoise in one batch (gill.diffusion.DiffusionBatcher)."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.config import GILLArgs  # noqa: E402
from gill.diffusion import DiffusionBatcher, GenerationJob, ImageGenerator, LoopSettings  # noqa: E402
from gill.errors import ConfigError, InputError  # noqa: E402
from gill.images import png_bytes  # noqa: E402
from gill.limits import Limits  # noqa: E402
from gill.model import default_dtype  # noqa: E402
from gill.options import GenerationOptions  # noqa: E402
from gill.serving import backend  # noqa: E402
from gill.serving.progress import Progress  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        self.limits = Limits.from_parameters(params)  # limit_max_denoising_steps, as the gill model's
        checkpoint = Path(params["checkpoint"])
        self.args = GILLArgs.load(checkpoint)
        self.device = device = backend.device(args)
        self.generator = ImageGenerator.from_checkpoint(self.args, checkpoint, device, default_dtype(device),
                                                        params.get("safety_checker", "false") == "true")
        self.cancels = backend.CancelRegistry()
        self.steps = backend.Counter("gill_denoising_steps_total", "Denoising steps run")
        self.outcomes = backend.Counter("gill_diffusion_requests_total", "Diffusion requests by outcome")
        self.batches = backend.Counter("gill_diffusion_batches_total", "Denoising loops run (one per batch)")
        max_batch, window_ms = params.get("max_batch", "4"), params.get("batch_window_ms", "20")
        if not max_batch.isdigit() or int(max_batch) < 1 or not window_ms.isdigit() or int(window_ms) > 10_000:
            raise ConfigError(f"diffusion parameters max_batch={max_batch!r}, batch_window_ms={window_ms!r} "
                              "(allowed: an integer >= 1, and whole milliseconds in [0, 10000])")
        self.progress = Progress(params.get("progress_file"))  # for the stub watchdog: a stuck loop is reloaded
        self.batcher = DiffusionBatcher(self.generator, int(max_batch), int(window_ms) / 1000,
                                        on_batch=lambda size: self.batches.add())

    def execute(self, requests):
        backend.dispatch(requests, self.cancels, "gill-diffusion", self._serve)
        return None

    def _serve(self, request, sender, cancel) -> None:
        # On the GPU when the mapper left them there (FORCE_CPU_ONLY_INPUT_TENSORS "no" in config.pbtxt).
        embeds = backend.torch_input(request, "PROMPT_EMBEDS", self.device)
        expected = (1, self.args.num_clip_tokens, self.args.gen_emb_dim)
        if embeds.shape != expected:
            raise InputError(f"PROMPT_EMBEDS has shape {list(embeds.shape)}; expected {list(expected)}")
        seed = int(backend.scalar(request, "SEED", -1))
        options = GenerationOptions(  # validates the ranges
            guidance_scale=float(backend.scalar(request, "GUIDANCE_SCALE", 7.5)),
            num_inference_steps=int(backend.scalar(request, "STEPS", 50)),
            preview_every=int(backend.scalar(request, "PREVIEW_EVERY", 0)),
            scheduler=str(backend.scalar(request, "SCHEDULER", "pndm")),
            seed=None if seed < 0 else seed)
        self.limits.check_options(options)
        progress = bool(backend.scalar(request, "PROGRESS", False))
        done = [0, 0]

        def on_step(step: int, total: int) -> None:
            done[:] = [step, total]
            self.progress.step()
            self.steps.add()
            if progress:
                sender.send(pb_utils.InferenceResponse(self._progress(step, total)))

        def on_preview(step: int, total: int, image) -> None:
            outputs = self._progress(step, total) + [backend.bytes_tensor("PREVIEW", [png_bytes(image)])]
            sender.send(pb_utils.InferenceResponse(outputs))

        self.progress.begin()
        try:
            # Requests with the same loop settings denoise together (max_batch, batch_window_ms in config.pbtxt).
            image = self.batcher.generate(
                GenerationJob(embeds, options.seed, cancel, on_preview, options.preview_every, on_step),
                LoopSettings(options.scheduler, options.num_inference_steps, options.guidance_scale))
            if image is None:
                self.outcomes.add(outcome="cancelled")
                pb_utils.Logger.log_info(
                    f"diffusion {request.request_id()!r} cancelled after step {done[0]} of {done[1]}")
                return
            self.outcomes.add(outcome="completed")
            sender.send(pb_utils.InferenceResponse([backend.bytes_tensor("IMAGE", [png_bytes(image)])]))
        finally:
            self.progress.end()

    @staticmethod
    def _progress(step: int, total: int) -> list:
        return [backend.tensor("STEP", np.array([step], dtype=np.int32)),
                backend.tensor("TOTAL_STEPS", np.array([total], dtype=np.int32))]
