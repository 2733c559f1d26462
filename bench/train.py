"""Training throughput: samples/s of GILL's training step, gradient checkpointing on against off, in one run.

    python bench/train.py                          # CPU: the small preset (OPT-125m, CLIP ViT-B/16 shapes)
    python bench/train.py --record                 # also records the table in docs/benchmarks.md
    python bench/train.py --device cuda            # small preset on a GPU: adds bf16 against fp32
    python bench/train.py --paper-scale            # GPU: OPT-6.7B + CLIP ViT-L/14 shapes, batch 200, peak memory
    python bench/train.py --paper-scale --shapes tiny --device cpu   # the paper-scale code path on a CPU, seconds

Each mode times whole optimiser steps (forward of every loss, backward, gradient clipping, AdamW, the ``[IMG]``
renormalisation) of :class:`~gill.training.objective.GILLObjective`, as :func:`gill.training.trainer.train` runs
them, on batches prepared beforehand, so data loading is not timed. The baseline is the reference's setting
(no gradient checkpointing, which the reference does not have); checkpointing is the knob that decides whether
the paper's batch of 200 fits one GPU, and the ratio says what it costs in speed.

The small preset trains on a shapes dataset at 224 px (``gill.training.shapes``) through the real data pipeline.
``--paper-scale`` builds the frozen models from the published configurations (``bench/footprint.py``) with
random weights directly on the GPU, in bf16 (no fp32 copy of 6.7B parameters is made), and random token and
pixel batches; it reports samples/s and the peak memory of each mode, or that it ran out of memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gill.training.batch import Batch
from gill.training.objective import GILLObjective
from gill.training.optim import clip_gradients, make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from footprint import SHAPES, build_adapters, build_lm, build_vision  # noqa: E402  (shared shape definitions)
from kv_cache import report, small_checkpoint  # noqa: E402  (the shared docs writer, the small preset)

MARK = "train"
GIB = 2**30


@dataclass(frozen=True)
class Mode:
    """One measured setting: the frozen models' dtype and whether the LM recomputes its activations."""

    name: str
    dtype: torch.dtype
    checkpointing: bool


@dataclass(frozen=True)
class Measurement:
    mode: Mode
    samples_per_s: float | None  # None: out of memory
    step_s: float | None
    peak_gib: float | None  # CUDA only


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(objective: GILLObjective, optimizer: torch.optim.Optimizer, batch: Batch,
             generator: torch.Generator) -> None:
    """One optimiser step as gill.training.trainer runs it (one process, no accumulation)."""
    optimizer.zero_grad(set_to_none=True)
    objective(batch, generator)["loss"].backward()
    clip_gradients(objective, 1.0)
    optimizer.step()
    objective.renormalise_img_rows()


def measure_group(objective: GILLObjective, modes: list[Mode], batches: list[Batch], warmup: int,
                  device: torch.device) -> list[Measurement]:
    """Time ``modes`` (same dtype) on one objective, interleaved step by step (A B A B ...), so that a machine
    that gets busier or quieter during the run shifts every mode alike; each mode sees the same batches and
    concatenation draws."""
    optimizer = make_optimizer(objective)
    generators = {mode: torch.Generator().manual_seed(0) for mode in modes}
    times: dict[Mode, list[float]] = {mode: [] for mode in modes}
    peaks: dict[Mode, float] = {mode: 0.0 for mode in modes}
    failed: set[Mode] = set()
    for index in range(warmup + len(batches)):
        for mode in modes:
            if mode in failed:
                continue
            objective.set_gradient_checkpointing(mode.checkpointing)
            objective.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            try:
                one_step(objective, optimizer, batches[index % len(batches)], generators[mode])
                synchronize(device)
            except torch.OutOfMemoryError:
                failed.add(mode)
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"{mode.name}: out of memory", flush=True)
                continue
            if index >= warmup:
                times[mode].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device) / GIB)
    results = []
    for mode in modes:
        if mode in failed:
            results.append(Measurement(mode, None, None, None))
            continue
        step = statistics.median(times[mode])
        results.append(Measurement(mode, len(batches[0]) / step, step, peaks[mode] if device.type == "cuda" else None))
        print(f"{mode.name}: {len(batches[0]) / step:.2f} samples/s ({step:.3f} s a step)", flush=True)
    return results


def measure(build: Callable[[Mode], GILLObjective], modes: list[Mode], batches: list[Batch], warmup: int,
            device: torch.device) -> list[Measurement]:
    """Every mode, built once per frozen dtype (the previous models freed first), in the order given."""
    results: dict[Mode, Measurement] = {}
    for dtype in dict.fromkeys(mode.dtype for mode in modes):
        group = [mode for mode in modes if mode.dtype == dtype]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        objective = build(group[0])
        for measurement in measure_group(objective, group, batches, warmup, device):
            results[measurement.mode] = measurement
        del objective
    return [results[mode] for mode in modes]


# ------------------------------------------------------------------------------------------------ small preset


def small_setup(device: torch.device, batch: int, steps: int, work: Path) -> tuple[Callable[[Mode], GILLObjective],
                                                                                   list[Batch]]:
    """The small preset and ``steps`` batches of a 224 px shapes dataset with SD targets, through the training
    data pipeline."""
    from gill.training.data import SampleEncoder, make_loader, open_dataset
    from gill.training.sd_targets import preprocess_sd_targets
    from gill.training.shapes import make_shapes_dataset

    checkpoint = small_checkpoint()
    dataset = make_shapes_dataset(work / "shapes", n_train=batch * steps, n_val=0, image_size=224, seed=0)
    preprocess_sd_targets(dataset.train_tsv, checkpoint, work / "targets", progress=False)
    encoder = SampleEncoder.from_checkpoint(checkpoint)
    loader = make_loader(open_dataset(dataset.train_tsv, encoder, targets_dir=work / "targets"), batch, seed=0)
    batches = [b.to(device) for b in loader if b is not None]

    def build(mode: Mode) -> GILLObjective:
        torch.manual_seed(0)
        return GILLObjective.from_checkpoint(checkpoint, device, mode.dtype, fresh_adapters=True)

    return build, batches


# ------------------------------------------------------------------------------------------------ paper scale


def paper_setup(shapes_name: str, device: torch.device, batch: int, steps: int,
                max_len: int = 32) -> tuple[Callable[[Mode], GILLObjective], list[Batch]]:
    """Random-weight frozen models of the published shapes, built on ``device``; random batches of ``batch``
    pairs: 224 px pixels, ``max_len`` tokens of BOS + 23 random tokens + ``[IMG0..7]``, SD targets."""
    from gill.tokens import SpecialTokens

    shapes = SHAPES[shapes_name]
    img = shapes.img_token_ids
    tokens = SpecialTokens(img=img, image=img[0] - 1, eos=shapes.lm["eos_token_id"], pad=shapes.lm["pad_token_id"],
                           newline=min(50118, img[0] - 2), vocab_size=shapes.lm["vocab_size"])
    generator = torch.Generator().manual_seed(0)
    size = shapes.vision["image_size"]
    args = shapes.args
    batches = []
    for _ in range(steps):
        words = torch.randint(4, img[0] - 1, (batch, max_len - len(img) - 1), generator=generator)
        ids = torch.cat([torch.full((batch, 1), shapes.lm["bos_token_id"]), words,
                         torch.tensor(img).expand(batch, -1)], dim=1)
        batches.append(Batch(torch.randn(batch, 3, size, size, generator=generator), ids, torch.ones_like(ids),
                             torch.randn(batch, args.num_clip_tokens, args.gen_emb_dim, generator=generator),
                             [str(i) for i in range(batch)]).to(device))

    def build(mode: Mode) -> GILLObjective:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(mode.dtype)  # the frozen models are made in their dtype: no fp32 copy
        try:
            with torch.device(device):
                lm, vision = build_lm(shapes), build_vision(shapes)
        finally:
            torch.set_default_dtype(previous)
        with torch.device(device):
            adapters = build_adapters(shapes)
        return GILLObjective(lm, vision, adapters, tokens, shapes.lm["bos_token_id"]).to(device)

    return build, batches


# ------------------------------------------------------------------------------------------------ report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown(results: list[Measurement], title: str, setting: str, device: torch.device) -> tuple[list[str], str]:
    marker = MARK + ("" if device.type == "cpu" else "-cuda") + ("-paper" if "paper" in title else "")
    baseline = results[0].samples_per_s
    lines = [f"<!-- {marker} -->", f"### {title}", "", setting, "",
             "| mode | samples/s | s/step | vs baseline | peak GiB |", "|---|---:|---:|---:|---:|"]
    for result in results:
        if result.samples_per_s is None:
            lines.append(f"| {result.mode.name} | out of memory | | | |")
            continue
        ratio = f"{result.samples_per_s / baseline:.2f}x" if baseline else "n/a"
        peak = f"{result.peak_gib:.1f}" if result.peak_gib is not None else "n/a"
        lines.append(f"| {result.mode.name} | {result.samples_per_s:.2f} | {result.step_s:.3f} | {ratio} | {peak} |")
    lines.append(f"<!-- /{marker} -->")
    return lines, marker


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu; --paper-scale: cuda)")
    parser.add_argument("--paper-scale", action="store_true", help="OPT-6.7B + ViT-L/14 shapes, random weights")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper", help="--paper-scale shapes (tiny: "
                        "the same code on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="pairs a step (default: 8 small, 200 paper)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps a mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps a mode")
    parser.add_argument("--record", action="store_true", help="record the table in docs/benchmarks.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if args.paper_scale else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.paper_scale and args.shapes == "paper" and device.type != "cuda":
        parser.error("--paper-scale needs a CUDA GPU (OPT-6.7B in bf16 is 13.4 GB before activations); "
                     "--shapes tiny --device cpu runs the same code here")
    fp32, bf16 = torch.float32, torch.bfloat16
    modes = [Mode("fp32, no checkpointing (baseline)", fp32, False), Mode("fp32, gradient checkpointing", fp32, True)]
    if device.type == "cuda":
        modes = [Mode("bf16, no checkpointing (baseline)", bf16, False), Mode("bf16, gradient checkpointing", bf16,
                                                                              True)]
        if not args.paper_scale:
            modes.append(Mode("fp32, no checkpointing", fp32, False))
    command = " ".join(["python bench/train.py", *(sys.argv[1:] if argv is None else argv)])
    if args.paper_scale:
        batch = args.batch or 200
        build, batches = paper_setup(args.shapes, device, batch, args.steps)
        title = f"Training step at paper scale (`{command}`)"
        described = "OPT-6.7B + CLIP ViT-L/14" if args.shapes == "paper" else "the paper's module types, cut down"
        setting = (f"`{args.shapes}` shapes ({described}), random weights built on the device; {machine(device)}; "
                   f"batch {batch} in one process, 32 tokens, caption concatenation p=0.5, every loss; median of "
                   f"{args.steps} steps after {args.warmup} warm-up.")
        results = measure(build, modes, batches, args.warmup, device)
    else:
        batch = args.batch or 8
        with tempfile.TemporaryDirectory(prefix="gill-bench-train-") as work:
            build, batches = small_setup(device, batch, args.steps, Path(work))
            results = measure(build, modes, batches, args.warmup, device)
        title = f"Training step, small preset (`{command}`)"
        setting = (f"`small` preset (OPT-125m + CLIP ViT-B/16 shapes, random weights), shapes dataset at 224 px; "
                   f"{machine(device)}; batch {batch}, 32 tokens, caption concatenation p=0.5, every loss (SD targets "
                   f"from the preset's text encoder); median of {args.steps} steps after {args.warmup} warm-up, "
                   "data loading not timed.")
    lines, marker = markdown(results, title, setting, device)
    report(lines, marker, args.record)
    return results


if __name__ == "__main__":
    main()
