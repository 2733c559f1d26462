"""Time per image: DPM-Solver++ at 20 and 25 steps vs the reference's PNDM at 50, in-process, same inputs.

    python bench/diffusion.py                          # the `small` preset; prints the table
    python bench/diffusion.py --write                  # also records it in docs/benchmarks.md
    python bench/diffusion.py --checkpoint DIR --device cuda

Every configuration denoises the same prompt embeddings from the same seed at the same resolution, one image
per call (VAE decode included), taking turns so that machine noise spreads evenly; each figure is the median of
``--repeats`` runs, and the ratio is against PNDM at 50 steps measured in the same run. The preset checkpoints
have random-weight UNets: this measures the cost of the step counts, not image quality. It also times a
latent-space preview (``gill.diffusion.latents_to_preview``: a linear map of the latents, no extra model) and
its PNG encoding against one denoising step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gill.config import GILLArgs
from gill.diffusion import ImageGenerator, latents_to_preview
from gill.images import png_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import report, small_checkpoint, synchronize  # noqa: E402  (the same checkpoint and docs writer)

MARK = "diffusion-scheduler"
BASELINE = ("pndm", 50)  # the reference's scheduler and step count
FAST = (("dpm++", 25), ("dpm++", 20))


def timed_once(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the `small` preset)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on the CPU, fp16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="measured images per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args()

    checkpoint = args.checkpoint or small_checkpoint()
    device = torch.device(args.device)
    generator = ImageGenerator.from_checkpoint(GILLArgs.load(checkpoint), checkpoint, device, torch.float32)
    unet = generator.pipe.unet
    side = unet.config.sample_size * generator.pipe.vae_scale_factor
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    configurations = [BASELINE, *FAST]

    def image(scheduler: str, steps: int):
        return generator.generate(embeds, scheduler=scheduler, num_inference_steps=steps, seed=args.seed)

    for scheduler, steps in configurations:  # warm-up: allocator, kernels, the negative prompt's encoding
        image(scheduler, steps)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configurations}
    for _ in range(args.repeats):
        for configuration in configurations:  # interleaved
            times[configuration].append(timed_once(lambda c=configuration: image(*c)))
    seconds = {c: statistics.median(t) for c, t in times.items()}

    # A preview, as the served model sends it: latents -> RGB (linear map) -> PNG; against one denoising step.
    latents = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                          generator=torch.Generator().manual_seed(2)).to(device, unet.dtype)
    preview_s = statistics.median(timed_once(lambda: latents_to_preview(latents)) for _ in range(50))
    preview_png_s = statistics.median(timed_once(lambda: png_bytes(latents_to_preview(latents))) for _ in range(50))

    baseline = seconds[BASELINE]
    rows = []
    for scheduler, steps in configurations:
        evaluations = generator.planned_steps(steps, scheduler)
        label = "PNDM (reference)" if scheduler == "pndm" else "DPM-Solver++"
        rows.append(f"| {label} | {steps} | {evaluations} | {seconds[scheduler, steps]:.3f} | "
                    f"{1000 * seconds[scheduler, steps] / evaluations:.1f} | "
                    f"{baseline / seconds[scheduler, steps]:.2f}x |")
    step_s = baseline / generator.planned_steps(BASELINE[1], BASELINE[0])
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, fp16, torch {torch.__version__}"
    else:
        machine = f"CPU fp32, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    name = "`small` preset" if args.checkpoint is None else f"checkpoint `{checkpoint.name}`"
    lines = [
        f"<!-- {MARK} -->",
        "### Diffusion schedulers: DPM-Solver++ vs the reference's PNDM-50 (`bench/diffusion.py`)",
        "",
        f"{name} (Stable Diffusion UNet {tuple(unet.config.block_out_channels)} channels, **random weights**: "
        "this measures how time per image scales with the step count, not image quality), "
        f"{machine}; {side}x{side} images ({unet.config.sample_size}x{unet.config.sample_size} latents), "
        f"guidance 7.5, the same prompt embeddings and seed {args.seed} for every row, VAE decode included; "
        f"median of {args.repeats} images each, the rows taking turns.",
        "",
        "| scheduler | steps | UNet evaluations | s/image (median) | ms/evaluation | speedup vs PNDM-50 |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "PNDM (SD v1.5's `skip_prk_steps` configuration) runs one more UNet evaluation than its step count. "
        "A preview is latent-space (`gill.diffusion.latents_to_preview`, a 4 -> 3 linear map of the latents; no "
        f"extra model): {1000 * preview_s:.2f} ms per preview, {1000 * preview_png_s:.2f} ms with the PNG encoding "
        f"the served model sends, against {1000 * step_s:.1f} ms per PNDM denoising step "
        f"({100 * preview_png_s / step_s:.2f}% of a step with `preview_every: 1`).",
        f"<!-- /{MARK} -->",
    ]
    report(lines, MARK, args.write)


if __name__ == "__main__":
    main()
