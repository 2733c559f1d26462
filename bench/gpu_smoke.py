"""One in-process turn of the tiny checkpoint on CUDA (bf16 LM, fp16 diffusion): the GPU code path works.

    python bench/gpu_smoke.py            # on a machine with a CUDA device

Checks both branches (retrieve and generate), seeded repeatability, and that KV-cached greedy decoding
agrees with the full-recompute baseline in bf16. Prints what it saw; exits non-zero on a failure.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from gill.decoding import Decoder, TokenStep, generate_without_cache
from gill.images import png_bytes
from gill.options import GenerationOptions
from gill.pipeline import Pipeline
from gill.tiny import make_checkpoint


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    directory = make_checkpoint(tempfile.mkdtemp(prefix="gill-tiny-"), seed=0)
    start = time.perf_counter()
    pipeline = Pipeline.from_checkpoint(directory, device="cuda")
    print(f"loaded on {torch.cuda.get_device_name()} in {time.perf_counter() - start:.1f} s; "
          f"LM {pipeline.components.model.dtype}, UNet {pipeline.components.generator.pipe.unet.dtype}")
    options = GenerationOptions(max_new_tokens=12, gen_scale_factor=1e5, min_word_tokens=3, num_inference_steps=10,
                                seed=3, stop_at_newline=False, stop_at_eos=False)
    head = pipeline.components.model.decision_head[1]
    failures = []
    for choice, bias in (("gen", [100.0, -100.0]), ("ret", [-100.0, 100.0])):
        with torch.no_grad():
            head.bias.copy_(torch.tensor(bias))
        first = pipeline.run([directory / "retrieval_images" / "00000.png", "Q: show me a red circle\nA:"], options)
        second = pipeline.run([directory / "retrieval_images" / "00000.png", "Q: show me a red circle\nA:"], options)
        sources = [image.source for image in first.images]
        same = first.text == second.text and [png_bytes(i.image) for i in first.images] == [
            png_bytes(i.image) for i in second.images]
        print(f"decision {choice}: images {sources}, {first.done.generated_tokens} tokens, repeatable={same}, "
              f"timings { {k: round(v, 3) for k, v in first.done.timings.items()} }")
        if sources != ["generated" if choice == "gen" else "retrieved"] or not same:
            failures.append(choice)

    tokens = pipeline.build_prompt(["Q: show me a red circle on a blue background\nA:"], options)
    prompt = pipeline.components.model.embed_prompt(tokens.ids, tokens.prefixes)
    greedy = GenerationOptions(max_new_tokens=24, stop_at_newline=False, stop_at_eos=False, max_images=0)
    model = pipeline.components.model
    cached = [s.tokens[0] for s in Decoder(model.lm, model.tokens).stream([prompt], greedy) if isinstance(s, TokenStep)]
    full, _ = generate_without_cache(model.lm, model.tokens, prompt, greedy)
    agree = sum(a == b for a, b in zip(cached, full))
    print(f"bf16 KV cache vs full recompute: {agree}/{len(full)} greedy tokens agree")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if failures:
        print(f"FAILED: {failures}")
        return 1
    print("gpu smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
