"""Load on the ``text_to_image`` ensemble with Triton's own ``perf_analyzer``: throughput and latency by concurrency.

    python bench/perf_analyzer.py                               # tiny checkpoint, concurrency 1 to 4
    python bench/perf_analyzer.py --write                       # also records it in docs/benchmarks.md
    python bench/perf_analyzer.py --torch-threads 1 --write     # one torch thread per model stub (CPU hosts)
    python bench/perf_analyzer.py --concurrency-range 1:8:1 --rounds 4 --csv /tmp/text_to_image.csv
    python bench/perf_analyzer.py --checkpoint /checkpoints/gill --rounds 2   # real weights: on a GPU machine
    python bench/perf_analyzer.py --url 127.0.0.1:8001 --api-key "$KEY"      # a `gill serve` already running

Unless ``--url`` is given, the script starts ``tritonserver`` on free loopback ports with the models the ensemble
needs (tokenize, llm, mapper, diffusion, text_to_image). It writes perf_analyzer's input-data JSON with one
prompt, sends two warm-up requests, then runs, once per concurrency level N::

    perf_analyzer -m text_to_image -i grpc --streaming -u HOST:PORT --input-data FILE \\
        --concurrency-range N --request-count ROUNDS*N -f LEVEL.csv

The ensemble is decoupled (``llm`` and ``diffusion`` are), so perf_analyzer must use the gRPC stream
(``--streaming``); it then times each request to its first response, and this ensemble sends exactly one (the
PNG) before the final flag, so the latency is the whole text -> image request. Each level runs a fixed number of
requests (``--request-count``) instead of perf_analyzer's stability windows: those want three windows within
10% and on a shared 2-core machine they do not settle, and an unstable level ends a sweep without a report;
perf_analyzer 2.51 also refuses ``--request-count`` with a multi-level ``--concurrency-range``, hence one run per
level. Every level runs the same number of rounds (requests = rounds x concurrency).

Baseline in the same run: concurrency 1. The ratio is throughput at N over throughput at 1 (1.00x: concurrent
requests gain nothing; N x: perfect scaling).

perf_analyzer: ``pip install 'perf-analyzer>=2.58'`` where glibc >= 2.38 (its wheels are manylinux_2_38;
below that pip falls back to the empty 0.1.0 placeholder). On older systems (Debian 12) the binary from the
``tritonclient`` 2.51.0 wheel (the server's version) runs: copy ``tritonclient-2.51.0.data/data/bin/perf_analyzer``
out of the wheel into the environment's ``bin/``, or pass ``--perf-analyzer PATH``.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gill.serving.server import TritonServer
from gill.tiny import ensure_tiny_checkpoint
from gill_client import API_KEY_HEADER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache import record  # noqa: E402  (the same docs writer)

MARK = "perf-analyzer"
MODEL = "text_to_image"
ENSEMBLE_MODELS = ("tokenize", "llm", "mapper", "diffusion", MODEL)
WARMUP_REQUESTS = 2  # the first requests pay one-off costs (lazy negative prompt embeddings, allocator growth)


@dataclass(frozen=True)
class Level:
    """One concurrency level as perf_analyzer's CSV reports it; latencies in seconds."""

    concurrency: int
    requests: int
    throughput: float  # completed requests (images) per second
    p50_s: float
    p90_s: float
    p99_s: float  # perf_analyzer's percentiles: the sample at that rank (a few dozen requests: p99 is the slowest)


def parse_range(text: str) -> list[int]:
    """perf_analyzer's ``start:end:step`` (end and step default to start and 1) -> the concurrency levels."""
    try:
        numbers = [int(part) for part in text.split(":")]
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 3 or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START[:END[:STEP]] with positive integers, e.g. 1:4")
    start = numbers[0]
    end = numbers[1] if len(numbers) > 1 else start
    step = numbers[2] if len(numbers) > 2 else 1
    if end < start:
        raise argparse.ArgumentTypeError(f"{text!r}: END must not be below START")
    return list(range(start, end + 1, step))


def find_perf_analyzer(explicit: str | None) -> Path:
    """``--perf-analyzer``, else ``perf_analyzer`` beside this interpreter, else on ``PATH``."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    found = explicit or (str(beside) if beside.exists() else shutil.which("perf_analyzer"))
    if not found or not Path(found).exists():
        sys.exit("perf_analyzer not found: pip install 'perf-analyzer>=2.58' (glibc >= 2.38), or take the binary "
                 "out of the tritonclient 2.51.0 wheel (see this script's docstring) and pass --perf-analyzer PATH")
    return Path(found)


def library_path(directory: Path) -> dict[str, str]:
    """The environment for perf_analyzer: the tritonclient 2.51 build links ``libb64.so.0d`` and
    ``libcudart.so.12`` (for CUDA shared memory, unused here), which Debian 12 lacks; nvidia-pytriton bundles
    both under auditwheel's renamed files, so they are linked here under their sonames. The 2.58+ wheel
    links neither and ignores the folder."""
    import pytriton

    bundled = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    for pattern, soname in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        matches = sorted(bundled.glob(pattern))
        if matches and not (directory / soname).exists():
            (directory / soname).symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(directory), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def perf_analyzer_version(binary: Path, env: dict[str, str]) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, timeout=60)
    text = result.stdout + result.stderr
    match = re.search(r"Perf Analyzer Version (\S+)", text)
    if match is None:
        hint = " (the wheel needs glibc >= 2.38; see the docstring)" if "GLIBC" in text else ""
        sys.exit(f"{binary} does not run{hint}:\n{text.strip()[-2000:]}")
    return match.group(1)


def run_perf_analyzer(binary: Path, env: dict[str, str], base: list[str], concurrency: int, requests: int,
                      report: Path, timeout: float, echo: bool = True) -> str:
    """One perf_analyzer run at one concurrency level; its output is echoed as it comes and returned."""
    command = [str(binary), *base, "--concurrency-range", str(concurrency), "--request-count", str(requests),
               "-f", str(report)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
        if time.monotonic() > deadline:
            process.kill()
            break
    code = process.wait()
    output = "".join(lines)
    # The 2.58+ wheel's entry point drops the binary's exit code, so a missing report counts as failure too.
    if code != 0 or not report.exists():
        sys.exit(f"perf_analyzer failed at concurrency {concurrency} (exit {code}):\n{output[-3000:]}")
    return output


def read_level(report: Path, requests: int) -> Level:
    with open(report, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Concurrency", "").strip().isdigit()]
    if len(rows) != 1:
        raise RuntimeError(f"{report}: expected one concurrency row, found {len(rows)}")
    row = rows[0]
    return Level(int(row["Concurrency"]), requests, float(row["Inferences/Second"]),
                 *(float(row[f"{name} latency"]) / 1e6 for name in ("p50", "p90", "p99")))


def server_version(url: str, headers: dict[str, str]) -> str:
    """Triton's version; also the check that the server answers with these headers before any load is sent."""
    try:
        with grpcclient.InferenceServerClient(url) as client:
            return client.get_server_metadata(headers=headers).version
    except InferenceServerException as error:
        sys.exit(f"{url}: {error.message()}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(levels: list[Level]) -> list[str]:
    base = levels[0]
    lines = ["| concurrency | requests | images/s | p50 s | p90 s | p99 s | throughput vs concurrency "
             f"{base.concurrency} | p50 vs concurrency {base.concurrency} |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in levels:
        lines.append(f"| {level.concurrency} | {level.requests} | {level.throughput:.2f} | {level.p50_s:.2f} "
                     f"| {level.p90_s:.2f} | {level.p99_s:.2f} | {level.throughput / base.throughput:.2f}x "
                     f"| {level.p50_s / base.p50_s:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="GILL checkpoint directory (default: the tiny one, built on "
                        "first use)")
    parser.add_argument("--url", help="gRPC HOST:PORT of a server already running (default: start one)")
    parser.add_argument("--api-key", help="sent as the triton-grpc-protocol-x-api-key header (and given to the "
                        "server this script starts); note it shows on perf_analyzer's command line")
    parser.add_argument("--concurrency-range", type=parse_range, default="1:4", metavar="START:END:STEP",
                        help="concurrency levels, perf_analyzer's syntax (default 1:4)")
    parser.add_argument("--rounds", type=int, default=6, help="requests per level = rounds x concurrency (default 6)")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the server this script starts (torch's "
                        "intra-op threads in every model stub; default: unset, as `gill serve` runs)")
    parser.add_argument("--perf-analyzer", help="the perf_analyzer binary (default: beside python, else on PATH)")
    parser.add_argument("--csv", type=Path, help="also write every level's perf_analyzer CSV row to this file")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one level may take (default 600)")
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.url and (args.checkpoint or args.torch_threads):
        parser.error("--checkpoint and --torch-threads set up the server this script starts; --url names a running one")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error("--torch-threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the server's environment is a copy of this one
    mark = MARK if args.torch_threads is None else f"{MARK}-torch-threads-{args.torch_threads}"

    work = Path(tempfile.mkdtemp(prefix="gill-perf-analyzer-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # on the error exits too
    binary = find_perf_analyzer(args.perf_analyzer)
    env = library_path(work)
    version = perf_analyzer_version(binary, env)
    print(f"perf_analyzer {version}: {binary}", flush=True)
    data = work / "input.json"
    # One request = one TEXT tensor of shape [1] (the ensemble's input, max_batch_size 0).
    data.write_text(json.dumps({"data": [{"TEXT": [args.prompt]}]}))
    headers = {API_KEY_HEADER: args.api_key} if args.api_key else {}

    checkpoint = None if args.url else (args.checkpoint or ensure_tiny_checkpoint())
    server = None if checkpoint is None else TritonServer(checkpoint, models=ENSEMBLE_MODELS, api_key=args.api_key)
    levels: list[Level] = []
    reports: list[Path] = []
    load_before = os.getloadavg()
    try:
        if server is not None:
            started = time.perf_counter()
            print(f"starting tritonserver ({', '.join(ENSEMBLE_MODELS)}) on {checkpoint}", flush=True)
            server.start(timeout=600)
            print(f"server ready in {time.perf_counter() - started:.0f} s at {server.endpoints.grpc}", flush=True)
        url = args.url or server.endpoints.grpc
        triton = server_version(url, headers)
        base = ["-m", MODEL, "-i", "grpc", "--streaming", "-u", url, "--input-data", str(data)]
        for name, value in headers.items():
            base += ["-H", f"{name}:{value}"]
        print(f"warm-up: {WARMUP_REQUESTS} requests", flush=True)
        run_perf_analyzer(binary, env, base, 1, WARMUP_REQUESTS, work / "warmup.csv", args.timeout, echo=False)
        load_before = os.getloadavg()
        measured = time.perf_counter()
        for concurrency in args.concurrency_range:
            requests = args.rounds * concurrency
            report = work / f"concurrency-{concurrency}.csv"
            print(f"\n=== concurrency {concurrency}: {requests} requests", flush=True)
            run_perf_analyzer(binary, env, base, concurrency, requests, report, args.timeout)
            levels.append(read_level(report, requests))
            reports.append(report)
        measured = time.perf_counter() - measured
        load_after = os.getloadavg()
    finally:
        if server is not None:
            server.close()

    if args.csv:
        with open(args.csv, "w") as out:
            for index, report in enumerate(reports):
                lines = report.read_text().splitlines()
                out.write("\n".join(lines if index == 0 else lines[1:2]) + "\n")  # one header, one row per level
        print(f"wrote {args.csv}")

    best = max(levels, key=lambda level: level.throughput)
    base_level, top = levels[0], levels[-1]
    if args.url:
        served = f"the server at {args.url}"
    else:
        name = "the tiny checkpoint (random weights)" if args.checkpoint is None else f"checkpoint {args.checkpoint}"
        threads = "" if args.torch_threads is None else f" and OMP_NUM_THREADS={args.torch_threads}"
        served = f"{name}, served by `tritonserver` with the ensemble's models only{threads}"
    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = (f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, {accelerator}; Triton {triton}, "
               f"perf_analyzer {version}")
    rounds = f"{args.rounds} rounds a level (requests = {args.rounds} x concurrency)"
    lines = [
        f"<!-- {mark} -->",
        "### Load: perf_analyzer against text_to_image (`bench/perf_analyzer.py"
        + ("" if args.torch_threads is None else f" --torch-threads {args.torch_threads}") + "`)",
        "",
        f"{machine}; {served}; the prompt "
        f"{args.prompt!r}, the ensemble's fixed settings (50 denoising steps, guidance 7.5); {rounds}, after "
        f"{WARMUP_REQUESTS} warm-up requests; {measured:.0f} s of load. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        *table(levels),
        "",
        f"At concurrency {top.concurrency}: {top.throughput / base_level.throughput:.2f}x the throughput of "
        f"concurrency {base_level.concurrency} ({top.concurrency / base_level.concurrency:.2f}x would be perfect "
        f"scaling, 1.00x means concurrent requests gain nothing) at {top.p50_s / base_level.p50_s:.2f}x its p50 "
        f"latency; the most throughput, {best.throughput:.2f} images/s, came at concurrency {best.concurrency}. "
        f"Latency is perf_analyzer's, at the client: from sending TEXT on the gRPC stream to the PNG response.",
        f"<!-- /{mark} -->",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.write:
        record(text, mark)


if __name__ == "__main__":
    main()
