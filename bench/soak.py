"""Soak: N concurrent streaming dialogues for M minutes on loopback; zero failed turns, bounded memory.

    python bench/soak.py --clients 8 --minutes 10           # starts its own server (tiny checkpoint)
    python bench/soak.py --url 127.0.0.1:8001 --api-key K --server-pid PID --clients 8 --minutes 60

Each client holds a conversation over the typed client (``gill_client``): a text turn, then a turn that
shows the previous reply's image back to the model, then one that asks for an image (generated with a few
denoising steps), and starts over after a few turns so the history stays within the model's window. The
resident memory (RSS) of the server's processes (``tritonserver`` and every backend stub) is measured after
a warm-up round and at the end; the run fails on any failed turn or on growth over ``--max-growth``
(a fraction of the post-warm-up RSS). A short run is part of the test suite (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

from gill_client import ChatOptions, GillClient, ImageEvent
from gill_client.errors import Internal, NotFound, Unavailable

MB = 1024 * 1024
TURNS_PER_CONVERSATION = 4
# A turn lost because a model's stub process died comes back UNAVAILABLE ("retry it"), or INTERNAL "Stub process
# ... is not healthy" when it is the dialogue model's own stub; the watchdog reloads the model within about 30 s.
# Triton 2.51's Python backend touches Python objects without the GIL on some paths (docs/reliability.md), so
# under heavy concurrency a stub can die. The soak retries such a turn as a client should, counts it as lost and
# retried, and fails only a turn that does not come back within RETRY_WITHIN_S. When the `gill` stub dies
# mid-turn, the llm and diffusion loops that were sending to it are stuck until the watchdog's stall timeout
# reloads them too: the client's idle timeout (30 s), the stall timeout and three reloads (about 15 s each).
RETRY_WITHIN_S = 240.0


@dataclass
class SoakReport:
    clients: int
    seconds: float
    turns: int = 0
    images: int = 0
    failures: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # turns lost to a dead stub, then answered on a retry
    rss_before: int = 0  # bytes, after the warm-up round
    rss_after: int = 0
    processes: int = 0

    @property
    def growth(self) -> float:
        """RSS growth as a fraction of the post-warm-up RSS."""
        return (self.rss_after - self.rss_before) / self.rss_before if self.rss_before else 0.0

    def table(self) -> str:
        return "\n".join([
            "| clients | seconds | turns | images | failed turns | lost, then retried | server RSS before | after | "
            "growth |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {self.clients} | {self.seconds:.0f} | {self.turns} | {self.images} | {len(self.failures)} | "
            f"{len(self.retried)} | "
            f"{self.rss_before / MB:.0f} MiB | {self.rss_after / MB:.0f} MiB | {self.growth:+.1%} |",
        ])


def server_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of process ``pid`` and all its descendants (zombies count 0), and how many there are."""
    root = psutil.Process(pid)
    total, count = 0, 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
            count += 1
        except psutil.Error:
            continue
    return total, count


_TURNS = (
    ("Q: what is a good name for a dog?", ChatOptions(max_new_tokens=8, max_images=0)),
    ("Q: and what is in this picture?", ChatOptions(max_new_tokens=8, max_images=0)),
    ("show me a picture of a red circle", ChatOptions(max_new_tokens=4, gen_scale_factor=1e5, min_word_tokens=1,
                                                     num_inference_steps=2, allow_retrieval=False)),
    ("Q: and a blue one?", ChatOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, max_images=0)),
)


def _client_loop(client: GillClient, index: int, stop: threading.Event, report: SoakReport, lock: threading.Lock,
                 rounds: int | None = None) -> None:
    turn = 0
    conversation = client.conversation()
    last_image: ImageEvent | None = None
    while not stop.is_set() and (rounds is None or turn < rounds):
        text, options = _TURNS[turn % len(_TURNS)]
        if turn % TURNS_PER_CONVERSATION == 0:
            conversation = client.conversation()
        parts: list = [text] if last_image is None or "picture" not in text else [last_image, text]
        options = dataclasses.replace(options, seed=index * 100_000 + turn)
        try:
            reply = _ask(conversation, parts, options, index, turn, report, lock)
            images = len(reply.images)
            if reply.images:
                last_image = reply.images[-1]
            with lock:
                report.turns += 1
                report.images += images
        except Exception as error:  # a soak counts every failure, whatever it is
            with lock:
                report.failures.append(f"client {index} turn {turn}: {type(error).__name__}: {error}")
        turn += 1


# While the watchdog reloads the dialogue model, Triton answers that it is unknown or not ready.
_RELOADING = ("is not healthy", "unknown model", "is not found", "is not ready", "the turn was lost")


def _stub_died(error: Exception) -> bool:
    return isinstance(error, Unavailable) or (isinstance(error, (Internal, NotFound))
                                              and any(marker in str(error) for marker in _RELOADING))


def _ask(conversation, parts: list, options: ChatOptions, index: int, turn: int, report: SoakReport,
         lock: threading.Lock):
    """One turn; a turn lost to a dead stub is asked again until RETRY_WITHIN_S has passed."""
    deadline = time.monotonic() + RETRY_WITHIN_S
    while True:
        try:
            return conversation.ask(*parts, options=options)
        except Exception as error:
            if not _stub_died(error) or time.monotonic() > deadline:
                raise
            with lock:
                if not any(lost.startswith(f"client {index} turn {turn}:") for lost in report.retried):
                    report.retried.append(f"client {index} turn {turn}: {type(error).__name__}: {error}")
            time.sleep(1.0)


def run_soak(url: str, server_pid: int, clients: int, seconds: float, api_key: str | None = None,
             turn_timeout: float = 300.0) -> SoakReport:
    """Warm up (one round per client), measure RSS, run ``clients`` dialogues for ``seconds``, measure again."""
    report = SoakReport(clients, seconds)
    lock = threading.Lock()
    with GillClient(url, api_key=api_key, timeout=turn_timeout) as client:
        warmups = [threading.Thread(target=_client_loop, args=(client, i, threading.Event(), report, lock,
                                                               len(_TURNS))) for i in range(clients)]
        for thread in warmups:
            thread.start()
        for thread in warmups:
            thread.join()
        report.turns = report.images = 0
        report.rss_before, report.processes = server_rss(server_pid)
        stop = threading.Event()
        threads = [threading.Thread(target=_client_loop, args=(client, i, stop, report, lock))
                   for i in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        stop.wait(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        report.seconds = time.monotonic() - started
        report.rss_after, _ = server_rss(server_pid)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent dialogues")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run after the warm-up")
    parser.add_argument("--url", help="a running server's gRPC host:port (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --url: the tritonserver process to measure")
    parser.add_argument("--api-key", help="with --url: the server's API key")
    parser.add_argument("--checkpoint", help="checkpoint to serve when starting a server (default: the tiny one)")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth (fraction)")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    if args.url:
        if args.server_pid is None:
            parser.error("--url needs --server-pid (the tritonserver process whose memory is measured)")
        report = run_soak(args.url, args.server_pid, args.clients, seconds, args.api_key)
    else:
        from gill.serving.server import TritonServer
        from gill.tiny import ensure_tiny_checkpoint

        with TritonServer(args.checkpoint or ensure_tiny_checkpoint()) as server:
            assert server.process is not None
            print(f"server up: {server.endpoints.grpc}; soaking {args.clients} clients for {args.minutes:g} min",
                  flush=True)
            report = run_soak(server.endpoints.grpc, server.process.pid, args.clients, seconds)
    print(report.table())
    print(f"processes measured: {report.processes}; turns/s: {report.turns / report.seconds:.2f}")
    for failure in report.failures[:20]:
        print("FAILED", failure)
    ok = not report.failures and report.growth <= args.max_growth
    print("PASS" if ok else f"FAIL: {len(report.failures)} failed turns, RSS growth {report.growth:+.1%} "
                            f"(allowed {args.max_growth:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
