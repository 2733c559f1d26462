"""Paper-scale GILL on one GPU: decode tokens/s against the memory-bandwidth bound, image and CLIP latency, peak memory.

    python bench/gpu_paper_scale.py --out $OUT          # on a CUDA machine: about 2-3 minutes on an H100
    python bench/gpu_paper_scale.py --write             # also records it in docs/benchmarks.md
    python bench/gpu_paper_scale.py --shapes tiny       # the same code paths on a CPU in seconds (the test's mode)
    python bench/gpu_paper_scale.py --record-from OUT/gpu_paper_scale.md   # back home: into docs/benchmarks.md

The whole served stack is built at once on the device with random weights from the published configurations
(``bench/footprint.py``: OPT-6.7B with GILL's 8 ``[IMG]`` rows, CLIP ViT-L/14's vision tower, GILL's adapters,
SD v1.5's UNet, VAE and text encoder), in the dtypes the project serves (``gill.model.default_dtype``: LM and
CLIP bf16; ``gill.diffusion``: Stable Diffusion fp16). Nothing is downloaded. Timings go through the project's
own ``gill.decoding.Decoder`` and ``gill.diffusion.ImageGenerator``; a plain transformers ``DynamicCache`` loop
(no sampling rules, no Python per row) is the baseline that shows the decoder's own overhead.

Decode speed is compared with its memory-bandwidth bound: one decode step must read every LM weight and the
KV cache once, so ``tokens/s <= batch * bandwidth / (weight bytes + KV bytes read)``. Bandwidth is both the
datasheet figure for the device and a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gill.decoding import Decoder, TokenStep
from gill.diffusion import ImageGenerator
from gill.model import default_dtype
from gill.options import GenerationOptions
from gill.tokens import SpecialTokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from footprint import (  # noqa: E402  (bench/footprint.py: the shared shape definitions)
    SHAPES,
    StackShapes,
    build_adapters,
    build_lm,
    build_text_encoder,
    build_unet,
    build_vae,
    build_vision,
    kv_bytes_per_token,
)
from kv_cache import record  # noqa: E402  (the shared docs writer)

MARK = "gpu-paper-scale"
GIB = 2**30
OUTPUT_NAME = "gpu_paper_scale"

# Datasheet HBM/GDDR bandwidth in bytes/s, matched against torch.cuda.get_device_name(); first match wins, so
# the more specific names come first ("H100 NVL" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # the 40 GB parts
    ("L40S", 0.864e12),
    ("L4", 0.300e12),
    ("A10", 0.600e12),  # A10 and A10G
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("RTX A6000", 0.768e12),
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Plan:
    """Sizes of the measured work; ``PLANS[shapes]`` gives the defaults, flags override them."""

    prompt: int  # prompt tokens prefilled before timed decoding
    long_prompt: int  # a second, near-full-window prompt: the KV cache becomes a real share of each step's reads
    new_tokens: int  # greedy tokens decoded per run (the first comes from the prefill)
    batches: tuple[int, ...]
    clip_batches: tuple[int, ...]
    repeats: int
    image_steps: tuple[int, int]  # DPM-Solver++ steps, PNDM steps (the reference's 50)
    micro_repeats: int  # runs of the millisecond-scale timings (CLIP, mapper)
    copy_bytes: int  # size of the device-to-device copy that measures bandwidth


PLANS = {
    "paper": Plan(prompt=128, long_prompt=1920, new_tokens=64, batches=(1, 8), clip_batches=(1, 8), repeats=3,
                  image_steps=(25, 50), micro_repeats=20, copy_bytes=2 * GIB),
    # As few steps as still go through every stage: the test runs it on two shared CPU cores.
    "tiny": Plan(prompt=16, long_prompt=96, new_tokens=4, batches=(1, 8), clip_batches=(1, 8), repeats=1,
                 image_steps=(2, 3), micro_repeats=2, copy_bytes=16 * 2**20),
}


class Progress:
    """Progress lines with the seconds since start, flushed at once (the run's log is read as it goes)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls, each synchronized on both ends."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def default_tensor_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Modules built under this context allocate and initialise their weights directly in ``dtype``:
    # no fp32 copy of 6.7B parameters ever exists.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class MemoryPhases:
    """Peak allocated/reserved bytes per named phase (CUDA only; empty on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()  # blocks cached by an earlier phase would count in this one's "reserved"
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.device.type == "cuda":
            synchronize(self.device)
            self.phases[name] = dict(allocated=torch.cuda.max_memory_allocated(self.device),
                                     reserved=torch.cuda.max_memory_reserved(self.device))


@dataclass
class Stack:
    """Every module of the served stack, resident on one device at once."""

    shapes: StackShapes
    device: torch.device
    lm: torch.nn.Module
    vision: torch.nn.Module
    adapters: torch.nn.Module
    generator: ImageGenerator
    tokens: SpecialTokens
    weight_bytes: dict[str, int]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of unique parameters and buffers as they sit on the device (tied weights once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_stack(shapes: StackShapes, device: torch.device, lm_dtype: torch.dtype, sd_dtype: torch.dtype,
                log: Progress) -> Stack:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from gill.tiny import build_char_clip_tokenizer

    with torch.device(device):
        with default_tensor_dtype(lm_dtype):
            lm = build_lm(shapes)
            log(f"OPT LM built: {sum(p.numel() for p in lm.parameters()) / 1e9:.2f} B parameters, {lm_dtype}")
            vision = build_vision(shapes)
            adapters = build_adapters(shapes)
            log("CLIP vision tower and GILL adapters built")
        with default_tensor_dtype(sd_dtype):
            unet, vae, text_encoder = build_unet(shapes), build_vae(shapes), build_text_encoder(shapes)
            log(f"SD UNet, VAE and text encoder built, {sd_dtype}")
    # The empty negative prompt goes through SD's own text encoder once, as served; the character-level CLIP
    # tokenizer of the tiny checkpoints encodes "" to the same bos/eos/pad ids layout without a download.
    with tempfile.TemporaryDirectory(prefix="gill-sd-tokenizer-") as directory:
        build_char_clip_tokenizer(Path(directory))
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**shapes.scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    vocab = shapes.lm["vocab_size"]
    img = shapes.img_token_ids
    tokens = SpecialTokens(img=img, image=img[0] - 1, eos=shapes.lm["eos_token_id"], pad=shapes.lm["pad_token_id"],
                           newline=min(50118, img[0] - 2), vocab_size=vocab)
    weight_bytes = dict(lm=module_bytes(lm), vision=module_bytes(vision), adapters=module_bytes(adapters),
                        unet=module_bytes(unet), vae=module_bytes(vae), text_encoder=module_bytes(text_encoder))
    return Stack(shapes, device, lm, vision, adapters, ImageGenerator(pipe), tokens, weight_bytes)


def random_prompts(stack: Stack, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """``batch`` prompts of ``length`` random ordinary token embeddings, ``[length, hidden]`` each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, stack.tokens.img[0] - 2, (batch, length), generator=generator)
    embedding = stack.lm.get_input_embeddings()
    with torch.inference_mode():
        return list(embedding(ids.to(stack.device)))


def decode_with_decoder(stack: Stack, prompts: list[torch.Tensor], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later step) of one greedy ``Decoder.stream`` run."""
    options = GenerationOptions(max_new_tokens=new_tokens, max_images=0, stop_at_eos=False, stop_at_newline=False)
    decoder = Decoder(stack.lm, stack.tokens)
    synchronize(stack.device)
    start = time.perf_counter()
    stamps = []
    for step in decoder.stream(prompts, options):
        if isinstance(step, TokenStep):  # its ids were read on the host, so the device has finished the step
            stamps.append(time.perf_counter())
    return stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


def decode_plain(stack: Stack, prompts: list[torch.Tensor], new_tokens: int) -> tuple[float, float]:
    """The same work as a bare transformers loop: prefill, then one-token forwards on a ``DynamicCache``."""
    from transformers import DynamicCache

    embeds = torch.stack(prompts)
    cache = DynamicCache(config=stack.lm.config)
    with torch.inference_mode():
        synchronize(stack.device)
        start = time.perf_counter()
        logits = stack.lm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize(stack.device)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = stack.lm(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize(stack.device)
        end = time.perf_counter()
    return first - start, (end - first) / max(1, new_tokens - 1)


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return name, value
    return name, None


def measured_bandwidth(device: torch.device, size: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = timed(device, lambda: [target.copy_(source) for _ in range(repeats)], 3)
    return 2 * size * repeats / seconds


def bench_decode(stack: Stack, plan: Plan, bandwidth: dict[str, float | None], memory: MemoryPhases,
                 log: Progress) -> list[dict[str, Any]]:
    rows = []
    element = next(stack.lm.parameters()).element_size()
    per_token_kv = kv_bytes_per_token(stack.shapes, element)
    cases = [(batch, plan.prompt) for batch in plan.batches] + [(max(plan.batches), plan.long_prompt)]
    warm = random_prompts(stack, 1, plan.prompt, seed=99)
    decode_with_decoder(stack, warm, 4)  # warm-up: kernels, allocator, cuBLAS handles
    decode_plain(stack, warm, 4)
    for batch, prompt_length in cases:
        prompts = random_prompts(stack, batch, prompt_length, seed=batch * 1000 + prompt_length)
        # Average context over the timed steps: each step reads the whole cache so far.
        kv_read = batch * (prompt_length + plan.new_tokens / 2) * per_token_kv
        step_bytes = stack.weight_bytes["lm"] + kv_read
        for method, run in (("gill.decoding.Decoder", decode_with_decoder), ("plain DynamicCache loop", decode_plain)):
            with memory.phase(f"decode {method} batch {batch} prompt {prompt_length}"):
                runs = [run(stack, prompts, plan.new_tokens) for _ in range(plan.repeats)]
            first = statistics.median(r[0] for r in runs)
            step = statistics.median(r[1] for r in runs)
            row = dict(method=method, batch=batch, prompt=prompt_length, new_tokens=plan.new_tokens,
                       first_token_s=first, step_s=step, tokens_per_s=batch / step,
                       weight_bytes=stack.weight_bytes["lm"], kv_bytes_read_per_step=kv_read)
            for source in ("spec", "measured"):
                if bandwidth[source]:
                    bound = batch * bandwidth[source] / step_bytes
                    row[f"bound_tokens_per_s_{source}"] = bound
                    row[f"fraction_of_bound_{source}"] = row["tokens_per_s"] / bound
            rows.append(row)
            log(f"decode {method}: batch {batch}, prompt {prompt_length}: first token {first * 1e3:.1f} ms, "
                f"{step * 1e3:.2f} ms/step, {batch / step:.1f} tokens/s"
                + (f" ({row['fraction_of_bound_spec']:.0%} of the spec bandwidth bound)"
                   if "fraction_of_bound_spec" in row else ""))
    return rows


def paint(stack: Stack, embeds: torch.Tensor, scheduler: str, steps: int) -> None:
    """One image through ``ImageGenerator.generate`` with ``scheduler`` ``"pndm"`` or ``"dpm++"``, CFG 7.5."""
    generator = stack.generator
    if "scheduler" in inspect.signature(generator.generate).parameters:  # the generator picks it by name
        generator.generate(embeds, scheduler=scheduler, guidance_scale=7.5, num_inference_steps=steps, seed=0)
        return
    # A generator without scheduler choice runs its pipeline's own: swap it in (SD v1.5's config either way).
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    pndm = PNDMScheduler(**stack.shapes.scheduler)
    generator.pipe.scheduler = pndm if scheduler == "pndm" else DPMSolverMultistepScheduler.from_config(
        pndm.config, algorithm_type="dpmsolver++")
    generator.generate(embeds, guidance_scale=7.5, num_inference_steps=steps, seed=0)


def bench_images(stack: Stack, plan: Plan, memory: MemoryPhases, log: Progress) -> dict[str, Any]:
    pipe = stack.generator.pipe
    fast_steps, reference_steps = plan.image_steps
    schedulers = (("DPM-Solver++ (DPMSolverMultistep)", fast_steps, "dpm++"),
                  ("PNDM (SD v1.5 default, the reference)", reference_steps, "pndm"))
    gen_dim = stack.shapes.args.gen_emb_dim
    dtype = pipe.unet.dtype
    embeds = torch.randn(1, stack.shapes.args.num_clip_tokens, gen_dim, generator=torch.Generator().manual_seed(0))
    embeds = embeds.to(stack.device, dtype)
    rows = []
    with warnings.catch_warnings():
        # Random weights give a meaningless (possibly non-finite) image; casting it to uint8 warns. Timing is the point.
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, steps, scheduler in schedulers:
            paint(stack, embeds, scheduler, 2)  # warm-up
            with memory.phase(f"image {steps} steps"):
                seconds = timed(stack.device, lambda scheduler=scheduler, steps=steps: paint(
                    stack, embeds, scheduler, steps), plan.repeats)
            rows.append(dict(scheduler=name, steps=steps, unet_batch=2, seconds=seconds))
            log(f"image {name}, {steps} steps, CFG 7.5: {seconds:.2f} s")
        vae = pipe.vae
        latent_side = stack.shapes.unet["sample_size"]
        latents = torch.randn(1, stack.shapes.vae["latent_channels"], latent_side, latent_side,
                              device=stack.device, dtype=dtype)
        with torch.inference_mode():
            vae.decode(latents / vae.config.scaling_factor)
            vae_seconds = timed(stack.device, lambda: vae.decode(latents / vae.config.scaling_factor), plan.repeats)
    for row in rows:
        row["unet_step_s"] = (row["seconds"] - vae_seconds) / row["steps"]
    log(f"VAE decode {stack.shapes.image_size} px: {vae_seconds * 1e3:.0f} ms")
    return dict(rows=rows, vae_decode_s=vae_seconds, image_size=stack.shapes.image_size,
                prompt_shape=list(embeds.shape))


def bench_clip(stack: Stack, plan: Plan, memory: MemoryPhases, log: Progress) -> list[dict[str, Any]]:
    side = stack.shapes.vision["image_size"]
    dtype = next(stack.vision.parameters()).dtype
    rows = []
    for batch in plan.clip_batches:
        pixels = torch.randn(batch, 3, side, side, device=stack.device, dtype=dtype)

        def encode(pixels: torch.Tensor = pixels) -> torch.Tensor:
            with torch.inference_mode():
                return stack.vision(pixel_values=pixels).pooler_output

        encode()
        with memory.phase(f"CLIP batch {batch}"):
            seconds = timed(stack.device, encode, plan.micro_repeats)
        rows.append(dict(batch=batch, seconds=seconds, images_per_s=batch / seconds))
        log(f"CLIP ViT vision tower, batch {batch}: {seconds * 1e3:.2f} ms")
    return rows


def bench_together(stack: Stack, plan: Plan, memory: MemoryPhases, log: Progress) -> dict[str, Any]:
    """Decode at the largest batch while an image denoises in another thread, as the served models overlap.

    Gives the real peak memory of both at once, and what each costs the other in time.
    """
    batch = max(plan.batches)
    prompts = random_prompts(stack, batch, plan.prompt, seed=7)
    steps = plan.image_steps[1]
    pipe = stack.generator.pipe
    embeds = torch.randn(1, stack.shapes.args.num_clip_tokens, stack.shapes.args.gen_emb_dim,
                         generator=torch.Generator().manual_seed(1)).to(stack.device, pipe.unet.dtype)
    failures: list[BaseException] = []
    image_s: list[float] = []

    def denoise() -> None:
        try:
            start = time.perf_counter()
            paint(stack, embeds, "pndm", steps)
            synchronize(stack.device)
            image_s.append(time.perf_counter() - start)
        except BaseException as error:  # re-raised in the main thread
            failures.append(error)

    with warnings.catch_warnings(), memory.phase(f"decode batch {batch} prompt {plan.prompt} + image at once"):
        warnings.simplefilter("ignore", RuntimeWarning)
        painter = threading.Thread(target=denoise, name="denoise")
        painter.start()
        _, step_s = decode_with_decoder(stack, prompts, plan.new_tokens)
        painter.join()
    if failures:
        raise failures[0]
    log(f"together: decode batch {batch} {batch / step_s:.1f} tokens/s while a {steps}-step image took "
        f"{image_s[0]:.2f} s")
    return dict(batch=batch, prompt=plan.prompt, steps=steps, tokens_per_s=batch / step_s, image_s=image_s[0])


def bench_mapper(stack: Stack, plan: Plan, log: Progress) -> float:
    """Seconds for GILL's mapper: 8 ``[IMG]`` states -> ``[1, 77, 768]`` prompt embeddings."""
    width = stack.shapes.lm["hidden_size"]
    dtype = next(stack.adapters.parameters()).dtype
    states = torch.randn(1, stack.shapes.args.num_tokens, width, device=stack.device, dtype=dtype)
    rows = stack.lm.get_input_embeddings()(torch.tensor([stack.tokens.img], device=stack.device))

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return stack.adapters.prompt_embeddings(states, rows)

    run()
    seconds = timed(stack.device, run, plan.micro_repeats)
    log(f"GILL mapper, 8 [IMG] states -> 77x{stack.shapes.args.gen_emb_dim}: {seconds * 1e3:.2f} ms")
    return seconds


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    info = dict(torch=torch.__version__, transformers=transformers.__version__, diffusers=diffusers.__version__,
                python=platform.python_version(), cuda=torch.version.cuda, driver=None, device_name=None)
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_memory"] = torch.cuda.get_device_properties(device).total_memory
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20).stdout.strip().splitlines()[0]
    else:
        info["device_name"] = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return info


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def markdown(result: dict[str, Any]) -> str:
    env, mem = result["environment"], result["memory"]
    spec, measured = result["bandwidth"]["spec"], result["bandwidth"]["measured"]
    lines = [
        f"<!-- {MARK} -->",
        f"### Paper-scale stack on one GPU (`bench/gpu_paper_scale.py`, shapes `{result['shapes']}`)",
        "",
        f"{env['device_name']}; driver {env['driver'] or 'n/a'}, CUDA {env['cuda'] or 'n/a'}; torch {env['torch']}, "
        f"transformers {env['transformers']}, diffusers {env['diffusers']}. Random weights from the published "
        f"configs, whole stack resident at once: LM and CLIP {result['dtypes']['lm']}, Stable Diffusion "
        f"{result['dtypes']['sd']}. Built in {result['build_s']:.0f} s. Command: `{result['command']}`.",
        "",
        "#### Decoding (greedy, KV cache) against the memory-bandwidth bound",
        "",
        f"Bound = batch x bandwidth / (LM weight bytes {gib(result['decode'][0]['weight_bytes'])} GiB + KV bytes read "
        "per step at the mean context). Bandwidth: datasheet "
        + (f"{spec / 1e12:.2f} TB/s" if spec else "n/a (device not in the table)")
        + f", measured device-to-device copy {measured / 1e12:.3f} TB/s. Median of {result['plan']['repeats']} runs; "
        f"{result['plan']['new_tokens']} tokens each.",
        "",
        "| method | batch | prompt | first token ms | ms/step | tokens/s | bound tokens/s (datasheet) | "
        "% of bound (datasheet) | % of bound (measured copy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["decode"]:
        bound = row.get("bound_tokens_per_s_spec")
        spec_pct = row.get("fraction_of_bound_spec")
        meas_pct = row.get("fraction_of_bound_measured")
        lines.append(
            f"| {row['method']} | {row['batch']} | {row['prompt']} | {row['first_token_s'] * 1e3:.1f} | "
            f"{row['step_s'] * 1e3:.2f} | {row['tokens_per_s']:.1f} | {f'{bound:.1f}' if bound else 'n/a'} | "
            f"{f'{spec_pct:.0%}' if spec_pct else 'n/a'} | {f'{meas_pct:.0%}' if meas_pct else 'n/a'} |")
    images, together = result["images"], result["together"]
    alone_rate = next(r["tokens_per_s"] for r in result["decode"] if r["method"] == "gill.decoding.Decoder"
                      and r["batch"] == together["batch"] and r["prompt"] == together["prompt"])
    alone_image = next(r["seconds"] for r in images["rows"] if r["steps"] == together["steps"])
    lines += [
        "",
        f"#### Image generation ({images['prompt_shape']} prompt embeddings -> {images['image_size']} px, CFG 7.5 "
        "so UNet batch 2, VAE decode included; `gill.diffusion.ImageGenerator`)",
        "",
        "| scheduler | steps | median s | UNet step ms (approx.) |",
        "|---|---:|---:|---:|",
        *[f"| {r['scheduler']} | {r['steps']} | {r['seconds']:.2f} | {r['unet_step_s'] * 1e3:.1f} |"
          for r in images["rows"]],
        "",
        f"VAE decode alone: {images['vae_decode_s'] * 1e3:.0f} ms. GILL mapper (8 `[IMG]` states -> "
        f"{images['prompt_shape']}): "
        f"{result['mapper_s'] * 1e3:.2f} ms.",
        "",
        f"Both at once (a denoising thread beside the decoder, as the served models overlap): decoding batch "
        f"{together['batch']} ran at {together['tokens_per_s']:.1f} tokens/s (alone: {alone_rate:.1f}) while a "
        f"{together['steps']}-step image took {together['image_s']:.2f} s (alone: {alone_image:.2f} s).",
        "",
        f"#### CLIP image encoding (vision tower, {result['clip_image_size']} px; ViT-L/14 at paper shapes)",
        "",
        "| batch | ms | images/s |",
        "|---:|---:|---:|",
        *[f"| {r['batch']} | {r['seconds'] * 1e3:.2f} | {r['images_per_s']:.0f} |" for r in result["clip"]],
        "",
        "#### GPU memory",
        "",
    ]
    if mem["resident_allocated"] is None:
        lines.append("Not measured on a CPU.")
    else:
        weights, plan = result["weight_bytes"], result["plan"]
        batch = max(plan["batches"])
        long_kv = next(r["kv_bytes_read_per_step"] for r in result["decode"] if r["prompt"] == plan["long_prompt"])
        lines += [
            f"Weights resident: {gib(mem['resident_allocated'])} GiB allocated "
            f"(LM {gib(weights['lm'])}, CLIP {gib(weights['vision'])}, adapters {gib(weights['adapters'])}, "
            f"UNet {gib(weights['unet'])}, VAE {gib(weights['vae'])}, SD text encoder {gib(weights['text_encoder'])} "
            f"GiB), {gib(mem['resident_reserved'])} GiB reserved.",
            "",
            "| phase | peak allocated GiB | peak reserved GiB |",
            "|---|---:|---:|",
            *[f"| {name} | {gib(p['allocated'])} | {gib(p['reserved'])} |" for name, p in mem["phases"].items()],
            "",
            f"Whole stack, peak over all phases: **{gib(mem['peak_allocated'])} GiB allocated, "
            f"{gib(mem['peak_reserved'])} GiB reserved** (the largest is the batch-{batch} decode at a "
            f"{plan['long_prompt']}-token prompt, whose KV cache alone is about {gib(long_kv)} GiB). Decoding at batch "
            f"{batch} with the {plan['prompt']}-token prompt while an image denoises in another thread: "
            f"**{gib(mem['both_at_once'])} GiB allocated** (the two phases' increments added: "
            f"{gib(mem['both_at_once_estimate'])} GiB), which leaves "
            f"{gib(24 * GIB - mem['both_at_once'])} GiB of a 24 GiB card for the CUDA context (about 0.5 GiB, "
            "outside PyTorch's count) and more KV cache (0.5 MiB a token, 1 GiB per full 2048-token dialogue).",
        ]
    lines.append(f"<!-- /{MARK} -->")
    return "\n".join(lines)


def run(shapes: StackShapes, plan: Plan, device: torch.device, lm_dtype: torch.dtype, sd_dtype: torch.dtype,
        command: str, log: Progress) -> dict[str, Any]:
    env = environment(device)
    log(f"{env['device_name']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"diffusers {env['diffusers']}, CUDA {env['cuda']}, driver {env['driver']}")
    log(f"command: {command}")
    torch.manual_seed(0)
    start = time.perf_counter()
    stack = build_stack(shapes, device, lm_dtype, sd_dtype, log)
    build_s = time.perf_counter() - start
    name, spec = peak_bandwidth(device)
    measured = measured_bandwidth(device, plan.copy_bytes)
    log(f"bandwidth: datasheet {f'{spec / 1e12:.2f} TB/s' if spec else 'n/a'} ({name}), "
        f"measured copy {measured / 1e9:.1f} GB/s")
    bandwidth = dict(spec=spec, measured=measured, table_name=name)
    memory = MemoryPhases(device)
    resident = reserved = None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()  # drop what construction and the copy left cached: "reserved" means this stack
        resident, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        log(f"stack resident: {gib(resident)} GiB allocated, {gib(reserved)} GiB reserved")

    decode = bench_decode(stack, plan, bandwidth, memory, log)
    images = bench_images(stack, plan, memory, log)
    together = bench_together(stack, plan, memory, log)
    clip = bench_clip(stack, plan, memory, log)
    mapper_s = bench_mapper(stack, plan, log)

    memory_result: dict[str, Any] = dict(resident_allocated=resident, resident_reserved=reserved,
                                         phases=memory.phases, peak_allocated=None, peak_reserved=None,
                                         both_at_once=None, both_at_once_estimate=None)
    if memory.phases:
        memory_result["peak_allocated"] = max(p["allocated"] for p in memory.phases.values())
        memory_result["peak_reserved"] = max(p["reserved"] for p in memory.phases.values())
        # A chat turn's decoding (largest batch, the ordinary prompt; the long prompt is reported on its own)
        # and a denoising running at the same time on the same weights: measured, and the sum of the phases apart.
        alone = f"batch {max(plan.batches)} prompt {plan.prompt}"
        decode_peak = max(p["allocated"] for n, p in memory.phases.items()
                          if n.startswith("decode") and n.endswith(alone))
        image_peak = max(p["allocated"] for n, p in memory.phases.items() if n.startswith("image"))
        memory_result["both_at_once_estimate"] = decode_peak + image_peak - resident
        memory_result["both_at_once"] = memory.phases[f"decode {alone} + image at once"]["allocated"]
        log(f"peak: {gib(memory_result['peak_allocated'])} GiB allocated, "
            f"{gib(memory_result['peak_reserved'])} GiB reserved")
    return dict(shapes=shapes.name, command=command, environment=env, plan=plan.__dict__,
                dtypes=dict(lm=str(lm_dtype).removeprefix("torch."), sd=str(sd_dtype).removeprefix("torch.")),
                build_s=build_s, weight_bytes=stack.weight_bytes, bandwidth=bandwidth, decode=decode, images=images,
                together=together, clip=clip, clip_image_size=shapes.vision["image_size"], mapper_s=mapper_s,
                memory=memory_result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--lm-dtype", choices=sorted(DTYPES), default=None,
                        help="LM, CLIP and adapters dtype (default: the project's, bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens before timed decoding")
    parser.add_argument("--long-prompt", type=int, default=None, help="the near-full-window prompt length")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw numbers to this file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder to write {OUTPUT_NAME}.md and {OUTPUT_NAME}.json into (e.g. $OUT)")
    parser.add_argument("--record-from", type=Path, default=None, metavar="MD",
                        help=f"run nothing: record a {OUTPUT_NAME}.md written by an earlier run (on the GPU "
                             "machine) into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.record_from is not None:
        table = args.record_from.read_text().strip()
        if not (table.startswith(f"<!-- {MARK} -->") and table.endswith(f"<!-- /{MARK} -->")):
            parser.error(f"{args.record_from} is not a {OUTPUT_NAME}.md section (no <!-- {MARK} --> markers)")
        record(table, MARK)
        return {}

    shapes = SHAPES[args.shapes]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device "
                     f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if shapes.name != "tiny" and device.type != "cuda":
        parser.error(f"--shapes {shapes.name} needs a CUDA GPU with at least 20 GiB free (the stack's weights are "
                     "about 15 GiB in 16-bit); torch sees none here. Use --shapes tiny to run the same code on a CPU.")
    defaults = PLANS[shapes.name]
    plan = Plan(prompt=args.prompt or defaults.prompt, long_prompt=args.long_prompt or defaults.long_prompt,
                new_tokens=args.new_tokens or defaults.new_tokens, batches=defaults.batches,
                clip_batches=defaults.clip_batches, repeats=args.repeats or defaults.repeats,
                image_steps=defaults.image_steps, micro_repeats=defaults.micro_repeats, copy_bytes=defaults.copy_bytes)
    lm_dtype = DTYPES[args.lm_dtype] if args.lm_dtype else default_dtype(device)
    sd_dtype = torch.float16 if device.type == "cuda" else torch.float32  # as gill.diffusion loads it
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python bench/gpu_paper_scale.py", *given])

    log = Progress()
    result = run(shapes, plan, device, lm_dtype, sd_dtype, command, log)
    result["total_s"] = time.perf_counter() - log.start
    table = markdown(result)
    print(table, flush=True)
    raw = json.dumps(result, indent=2, default=str)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(raw + "\n")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{OUTPUT_NAME}.md").write_text(table + "\n")
        (args.out / f"{OUTPUT_NAME}.json").write_text(raw + "\n")
        log(f"wrote {args.out / OUTPUT_NAME}.md and .json")
    if args.write:
        record(table, MARK)
    log(f"done in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
