"""The gill model's two transports to the other models, BLS vs gRPC on loopback: stub deaths under load, latency.

    python bench/transport.py                        # tiny checkpoint, llm.max_batch=8, 3 rounds
    python bench/transport.py --rounds 5 --seconds 12 --clients 8

Two servers run side by side, identical but for the ``gill`` model's ``transport`` parameter (``bls``, ``grpc``;
model_repository/gill/config.pbtxt), both with the ``llm`` model's ``max_batch`` at 8. Each round, taking turns
(the order alternates between rounds), each server gets:

1. latency: greedy text turns (images off), one at a time, then as 8 concurrent streams of 2 turns: turn time,
   time to first text, and time per output token after the first (TPOT);
2. a soak-style load (bench/soak.py: a warm-up round, then ``--clients`` dialogues of text, image-shown and
   generated-image turns for ``--seconds``), counting stub deaths: models the stub watchdog had to reload, and
   turns lost to a dead stub (then retried by the soak).

The ratios are gRPC over BLS, from the same rounds. Only one server works at a time; the idle one costs memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (bench/soak.py)

from gill.serving.server import TritonServer  # noqa: E402
from gill_client import ChatOptions, GillClient  # noqa: E402
from gill_client import Done as WireDone  # noqa: E402
from gill_client import TextDelta as WireText  # noqa: E402

TRANSPORTS = ("bls", "grpc")
PROMPTS = ["what is the capital of france", "tell me about your favourite dog", "describe a quiet morning",
           "how do I bake bread at home", "what should I wear for a hike", "write a line about autumn leaves",
           "which planet is the largest", "show me a red circle"]


@dataclass
class Timing:
    turn_s: float
    ttft_s: float
    tpot_s: float


@dataclass
class Tally:
    alone: list[Timing] = field(default_factory=list)
    together: list[Timing] = field(default_factory=list)
    latency_errors: int = 0
    runs: int = 0
    runs_with_deaths: int = 0
    reloads: int = 0
    reloaded_models: list[str] = field(default_factory=list)
    turns: int = 0
    lost_then_retried: int = 0
    failed: int = 0


def timed_turn(client: GillClient, prompt: str, options: ChatOptions) -> Timing:
    start = time.perf_counter()
    first = None
    for event in client.chat(prompt, options):
        if isinstance(event, WireText) and first is None:
            first = time.perf_counter()
        elif isinstance(event, WireDone):
            end = time.perf_counter()
            first = first or end
            return Timing(end - start, first - start, (end - first) / max(1, event.generated_tokens - 1))
    raise RuntimeError("the stream ended without Done")


def latency(server: TritonServer, tally: Tally, options: ChatOptions, streams: int = 8, rounds: int = 2) -> None:
    with GillClient(server.endpoints.grpc, timeout=120) as client:
        for prompt in PROMPTS:
            try:
                tally.alone.append(timed_turn(client, prompt, options))
            except Exception:  # noqa: BLE001 - a stub death shows in the soak's count; here it only loses a sample
                tally.latency_errors += 1
        gate = threading.Barrier(streams)
        lock = threading.Lock()

        def stream(index: int) -> None:
            gate.wait()
            for turn in range(rounds):
                try:
                    timing = timed_turn(client, PROMPTS[(index + turn) % len(PROMPTS)], options)
                    with lock:
                        tally.together.append(timing)
                except Exception:  # noqa: BLE001
                    with lock:
                        tally.latency_errors += 1

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def wait_ready(server: TritonServer, timeout: float = 180.0) -> None:
    """Until the watchdog has no reload in progress and the server reports ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = server.watchdog is not None and any(r.finished is None for r in server.watchdog.recoveries)
        try:
            ready = requests.get(f"{server.endpoints.http}/v2/health/ready", timeout=5).status_code == 200
        except requests.RequestException:
            ready = False
        if ready and not busy:
            return
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def soak_run(server: TritonServer, tally: Tally, clients: int, seconds: float) -> None:
    assert server.watchdog is not None and server.process is not None
    before = len(server.watchdog.recoveries)
    # A turn caught by a stub death can hang until its deadline (measured with BLS: 5 minutes); 60 s bounds a run.
    report = soak.run_soak(server.endpoints.grpc, server.process.pid, clients, seconds, turn_timeout=60)
    time.sleep(2.5)  # the watchdog polls every second
    reloads = server.watchdog.recoveries[before:]
    tally.runs += 1
    tally.runs_with_deaths += bool(reloads or report.retried)
    tally.reloads += len(reloads)
    tally.reloaded_models += [r.model for r in reloads]
    tally.turns += report.turns
    tally.lost_then_retried += len(report.retried)
    tally.failed += len(report.failures)
    print(f"  soak: {report.turns} turns, {len(reloads)} reload(s) {[r.model for r in reloads]}, "
          f"{len(report.retried)} lost then retried, {len(report.failures)} failed", flush=True)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="soak dialogues at once")
    parser.add_argument("--seconds", type=float, default=12.0, help="soak length per run, after its warm-up")
    parser.add_argument("--max-batch", default="8", help="the llm model's max_batch on both servers")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per latency turn")
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: the tiny one)")
    args = parser.parse_args()

    from gill.tiny import ensure_tiny_checkpoint

    checkpoint = args.checkpoint or ensure_tiny_checkpoint()
    options = ChatOptions(max_new_tokens=args.new_tokens, temperature=0.0, max_images=0)
    servers = {name: TritonServer(checkpoint, parameters={"llm": {"max_batch": args.max_batch},
                                                          "gill": {"transport": name}}) for name in TRANSPORTS}
    tallies = {name: Tally() for name in TRANSPORTS}
    try:
        for name, server in servers.items():
            print(f"starting the {name} server", flush=True)
            server.start(timeout=600)
        for round_index in range(args.rounds):
            order = TRANSPORTS if round_index % 2 == 0 else TRANSPORTS[::-1]
            for name in order:
                print(f"round {round_index + 1}, {name}", flush=True)
                wait_ready(servers[name])
                latency(servers[name], tallies[name], options)
                wait_ready(servers[name])
                soak_run(servers[name], tallies[name], args.clients, args.seconds)
            summary(tallies, args)  # after every round: a run cut short still leaves its numbers
    finally:
        for server in servers.values():
            server.close()


def summary(tallies: dict[str, Tally], args: argparse.Namespace) -> None:
    print()
    print(f"llm.max_batch={args.max_batch}; soak: {args.clients} clients, {args.seconds:g} s per run (after a "
          f"warm-up round), {args.rounds} run(s) per transport; latency: greedy text turns of up to "
          f"{args.new_tokens} tokens, images off")
    print()
    print("| transport | soak runs | runs with a stub death | model reloads | turns | lost, then retried | failed "
          "| turn ms alone | TPOT ms alone | turn ms, 8 streams | TTFT ms, 8 streams | TPOT ms, 8 streams |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, tally in tallies.items():
        print(f"| {name} | {tally.runs} | {tally.runs_with_deaths} | {tally.reloads} "
              f"{sorted(set(tally.reloaded_models)) or ''} | {tally.turns} | {tally.lost_then_retried} | "
              f"{tally.failed} | {median_ms([t.turn_s for t in tally.alone]):.0f} | "
              f"{median_ms([t.tpot_s for t in tally.alone]):.1f} | {median_ms([t.turn_s for t in tally.together]):.0f} "
              f"| {median_ms([t.ttft_s for t in tally.together]):.0f} | "
              f"{median_ms([t.tpot_s for t in tally.together]):.1f} |")
    bls, grpc = tallies["bls"], tallies["grpc"]
    for label, pick in (("turn alone", lambda t: t.alone), ("turn, 8 streams", lambda t: t.together)):
        ratio = median_ms([t.turn_s for t in pick(grpc)]) / median_ms([t.turn_s for t in pick(bls)])
        print(f"gRPC / BLS, median {label}: {ratio:.2f}x")
    for label, pick in (("TPOT alone", lambda t: t.alone), ("TPOT, 8 streams", lambda t: t.together)):
        ratio = median_ms([t.tpot_s for t in pick(grpc)]) / median_ms([t.tpot_s for t in pick(bls)])
        print(f"gRPC / BLS, median {label}: {ratio:.2f}x")
    print(f"latency samples lost to errors: bls {bls.latency_errors}, grpc {grpc.latency_errors}")


if __name__ == "__main__":
    main()
