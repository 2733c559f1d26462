"""KV-cached decoding vs the reference's full recompute, on the ``small`` preset (OPT-125m shapes).

    python bench/kv_cache.py                    # prints the table
    python bench/kv_cache.py --write            # also records it in docs/benchmarks.md

Both methods decode the same 32 greedy tokens after the same 256-token context, in one run, on this
machine; the script checks they produce identical tokens before it reports the speedup.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from gill.decoding import Decoder, TokenStep, generate_without_cache
from gill.model import GILL
from gill.options import GenerationOptions
from gill.tiny import default_home, make_checkpoint, synthetic_captions

ROOT = Path(__file__).resolve().parent.parent
MARK = "kv-cache"


def small_checkpoint(seed: int = 0) -> Path:
    directory = default_home() / f"small-seed{seed}"
    if not (directory / ".complete").exists():
        print(f"building the small preset in {directory} (first run only)")
        make_checkpoint(directory, seed=seed, preset="small")
        (directory / ".complete").write_text("built by bench/kv_cache.py\n")
    return directory


def context(model: GILL, length: int) -> torch.Tensor:
    text = " ".join(synthetic_captions())
    ids = model.tokenize(text, add_bos=True)[:length]
    assert ids.shape[0] == length, "corpus too short for the context length"
    return model.embed_tokens(ids)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GILL.from_checkpoint(small_checkpoint(), device=args.device)
    prompt = context(model, args.context)
    options = GenerationOptions(max_new_tokens=args.new_tokens, max_images=0, stop_at_eos=False, stop_at_newline=False)
    decoder = Decoder(model.lm, model.tokens)

    def cached() -> list[int]:
        return [s.tokens[0] for s in decoder.stream([prompt], options) if isinstance(s, TokenStep)]

    def recompute() -> list[int]:
        return generate_without_cache(model.lm, model.tokens, prompt, options)[0]

    cached()  # warm-up: allocator, kernels
    full_s, full_tokens = timed(recompute, args.repeats)
    kv_s, kv_tokens = timed(cached, args.repeats)
    assert kv_tokens == full_tokens, "the two methods must decode the same tokens"
    speedup = full_s / kv_s
    rows = [
        ("full recompute (reference method)", full_s, args.new_tokens / full_s, 1.0),
        ("KV cache (gill.decoding.Decoder)", kv_s, args.new_tokens / kv_s, speedup),
    ]
    if model.device.type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}"
    else:
        machine = f"CPU fp32, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    marker = MARK if model.device.type == "cpu" else MARK + "-cuda"
    lines = [
        f"<!-- {marker} -->",
        f"### KV-cached decoding vs full recompute (`bench/kv_cache.py --device {args.device}`)",
        "",
        f"`small` preset (OPT-125m shapes, random weights), {machine}; {args.context}-token context, "
        f"{args.new_tokens} greedy new tokens, median of {args.repeats} runs each, identical tokens checked.",
        "",
        "| method | seconds | tokens/s | speedup |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {seconds:.2f} | {rate:.1f} | {ratio:.1f}x |" for name, seconds, rate, ratio in rows],
        f"<!-- /{marker} -->",
    ]
    report(lines, marker, args.write)


def report(lines: list[str], marker: str, write: bool) -> None:
    """Print a benchmark's markdown section; with ``write``, also record it in docs/benchmarks.md."""
    section = "\n".join(lines)
    print(section)
    if write:
        record(section, marker)


def record(table: str, marker: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach figure is a ratio measured in one run.\n"
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(text)
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
