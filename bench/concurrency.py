"""Concurrent dialogue streams through Triton vs the same turns one at a time: aggregate tokens/s, TTFT, TPOT.

    python bench/concurrency.py                 # small preset, 1 2 4 8 streams
    python bench/concurrency.py --write         # also records it in docs/benchmarks.md

One server (the `small` preset: OPT-125m shapes, random weights) serves every level. At each level N the
same N x rounds greedy text turns run twice, interleaved: one at a time (the baseline) and as N concurrent
streams, each stream running its turns back to back. The ratio is concurrent over one-at-a-time aggregate
tokens/s in the same run: above 1 means concurrency raises throughput (the llm model decodes the turns in
flight in one batched forward per step), 1 means requests only queue. Per turn: time to first token (TTFT,
from sending the request to the first text event) and time per output token after the first (TPOT,
(done - first text) / (tokens - 1)), as percentiles over the turns of a level.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gill.serving.server import TritonServer
from gill_client import ChatOptions, GillClient, user
from gill_client import Done as WireDone
from gill_client import TextDelta as WireText

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import report, small_checkpoint  # noqa: E402  (the same checkpoint and docs writer)
from serving import triton_version  # noqa: E402

MARK = "concurrency"
PROMPTS = ["show me a red circle on a blue background", "what is the capital of france",
           "tell me about your favourite dog", "describe a quiet morning at the sea",
           "how do I bake bread at home", "what should I wear for a hike",
           "write a line about autumn leaves", "which planet is the largest"]


@dataclass
class Turn:
    start: float
    first: float
    end: float
    tokens: int
    text: str

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def tpot(self) -> float:
        return (self.end - self.first) / max(1, self.tokens - 1)


def run_turn(client: GillClient, prompt: str, options: ChatOptions) -> Turn:
    start = time.perf_counter()
    first = None
    for event in client.chat(user(prompt), options):
        if isinstance(event, WireText) and first is None:
            first = time.perf_counter()
        elif isinstance(event, WireDone):
            end = time.perf_counter()
            if first is None:
                raise RuntimeError(f"no text event for {prompt!r}")
            return Turn(start, first, end, event.generated_tokens, event.text)
    raise RuntimeError(f"the stream for {prompt!r} ended without Done")


@dataclass
class Load:
    turns: list[Turn]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.turns)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall_s


def one_at_a_time(client: GillClient, prompts: list[str], options: ChatOptions) -> Load:
    started = time.perf_counter()
    turns = [run_turn(client, prompt, options) for prompt in prompts]
    return Load(turns, time.perf_counter() - started)


def concurrent(client: GillClient, streams: list[list[str]], options: ChatOptions) -> Load:
    """Each stream on its own thread, its turns back to back; all streams start together."""
    results: list[list[Turn]] = [[] for _ in streams]
    errors: list[BaseException] = []
    gate = threading.Barrier(len(streams) + 1)

    def work(index: int) -> None:
        gate.wait()
        try:
            for prompt in streams[index]:
                results[index].append(run_turn(client, prompt, options))
        except BaseException as error:  # noqa: BLE001 - reported after the join
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Load([turn for stream in results for turn in stream], wall)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def scrape_rows(metrics_url: str) -> tuple[float, float]:
    """(decode steps, rows carried) from the llm model's counters."""
    import requests

    steps = rows = 0.0
    for line in requests.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("gill_llm_decode_steps_total"):
            steps += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gill_llm_decode_rows_total"):
            rows += float(line.rsplit(" ", 1)[1])
    return steps, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="turns per stream at each level")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the small preset)")
    parser.add_argument("--max-batch", default="8", help="the llm model's max_batch (its config's default is 8)")
    parser.add_argument("--transport", choices=("bls", "grpc"),
                        help="how the gill model calls the other models (default: its config's)")
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args()

    options = ChatOptions(max_new_tokens=args.new_tokens, temperature=0.0, max_images=0)
    checkpoint = args.checkpoint or small_checkpoint()
    parameters = {"llm": {"max_batch": args.max_batch}}
    if args.transport:
        parameters["gill"] = {"transport": args.transport}
    server = TritonServer(checkpoint, parameters=parameters)
    rows = []
    try:
        print("starting tritonserver (all models)", flush=True)
        endpoints = server.start(timeout=600)
        version = triton_version(endpoints.http)
        client = GillClient(endpoints.grpc)
        reference = {prompt: run_turn(client, prompt, options) for prompt in PROMPTS}  # warm-up, expected text
        for level in args.levels:
            streams = [[PROMPTS[(i + r) % len(PROMPTS)] for r in range(args.rounds)] for i in range(level)]
            flat = [prompt for stream in streams for prompt in stream]
            alone = one_at_a_time(client, flat, options)
            before = scrape_rows(endpoints.metrics)
            together = concurrent(client, streams, options)
            after = scrape_rows(endpoints.metrics)
            for turn, prompt in zip(together.turns, [p for s in streams for p in s], strict=True):
                assert turn.text == reference[prompt].text, "a turn decoded beside others must equal it alone"
            mean_batch = (after[1] - before[1]) / max(1.0, after[0] - before[0])
            rows.append((level, alone, together, mean_batch))
            print(f"{level} streams: one at a time {alone.rate:.1f} tok/s, concurrent {together.rate:.1f} tok/s "
                  f"({together.rate / alone.rate:.2f}x), mean batch {mean_batch:.2f}", flush=True)
        client.close()
    finally:
        server.close()

    machine = (f"CPU fp32, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"Triton {version}")
    tokens = statistics.median(t.tokens for _, load, _, _ in rows for t in load.turns)
    lines = [
        f"<!-- {MARK} -->",
        "### Concurrent streams vs one at a time, served (`bench/concurrency.py`)",
        "",
        f"`small` preset (OPT-125m shapes, random weights), {machine}; greedy text turns of up to "
        f"{args.new_tokens} new tokens (median {tokens:.0f}), {args.rounds} turn(s) per stream, images off; at each "
        "level the same turns one at a time, then as concurrent streams (every concurrent turn's text checked "
        "equal to the same turn alone).",
        "",
        "| streams | one at a time tok/s | concurrent tok/s | ratio | mean decode batch | TTFT p50 / p90 / p99 ms "
        "| TPOT p50 / p90 / p99 ms | TTFT p50 alone ms | TPOT p50 alone ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, alone, together, mean_batch in rows:
        ttft = [t.ttft * 1e3 for t in together.turns]
        tpot = [t.tpot * 1e3 for t in together.turns]
        lines.append(
            f"| {level} | {alone.rate:.1f} | {together.rate:.1f} | {together.rate / alone.rate:.2f}x | "
            f"{mean_batch:.2f} | {' / '.join(f'{percentile(ttft, q):.0f}' for q in (50, 90, 99))} | "
            f"{' / '.join(f'{percentile(tpot, q):.1f}' for q in (50, 90, 99))} | "
            f"{statistics.median(t.ttft for t in alone.turns) * 1e3:.0f} | "
            f"{statistics.median(t.tpot for t in alone.turns) * 1e3:.1f} |")
    top = rows[-1]
    lines += [
        "",
        f"At {top[0]} streams the server delivered {top[2].rate / top[1].rate:.2f}x the tokens/s of the same turns "
        f"one at a time. The ratio is aggregate tokens/s, concurrent over one at a time, measured at the client "
        "(all tokens of the level over the wall time from the first request to the last Done). TTFT: request sent "
        "to first text event; TPOT: (Done - first text) / (tokens - 1), per turn; percentiles over the level's "
        "turns (few turns: p99 is the slowest or close to it). Mean decode batch: rows per batched forward "
        "of the llm model during the concurrent run, from its `gill_llm_decode_rows_total` / "
        "`gill_llm_decode_steps_total` counters.",
        f"<!-- /{MARK} -->",
    ]
    report(lines, MARK, args.write)


if __name__ == "__main__":
    main()
