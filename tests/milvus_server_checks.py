"""The retrieval code against a real Milvus server (Milvus 2.3.5 standalone, started by gill.milvus_server).

Run by tests/test_milvus_server.py inside a fresh network namespace (``unshare -rn``) holding only loopback:
Milvus 2.3 listens on every interface, and there the only interface is loopback. Writes what it observed to
``OUT/report.json``; any failed check raises (a non-zero exit, the traceback on stderr).

    unshare -rn python tests/milvus_server_checks.py OUT
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

from gill import milvus_server
from gill.milvus import Corpus, MilvusRetriever, connect, disconnect, ingest
from gill.milvus import normalized as unit
from gill.retrieval import ExactRetriever, RetrievalUnavailable

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """A new network namespace starts with ``lo`` down: bring it up (what ``ip link set lo up`` does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def corpus(rows: int, dim: int, seed: int, start: int = 0) -> Corpus:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    ids = np.arange(start, start + rows, dtype=np.int64)
    return Corpus(ids, [f"https://example.invalid/{i}.jpg" for i in ids], [f"caption {i}" for i in ids], vectors)


def main(out: Path) -> None:
    loopback_up()
    report: dict = {}
    server = milvus_server.start(out / "milvus", port=19530)
    try:
        # Small corpus: FLAT (exact), so the hits must be the reference's, scores scaled by exp(logit_scale).
        small = corpus(3000, 16, seed=0)
        half = Corpus(small.ids[:1500], small.urls[:1500], small.captions[:1500], small.vectors[:1500])
        first = ingest(half, server.uri, "small", batch_bytes=64 * 1024, progress=False)  # an ingest cut short
        resumed = ingest(small, server.uri, "small", batch_bytes=64 * 1024, progress=False)
        again = ingest(small, server.uri, "small", batch_bytes=64 * 1024, progress=False)
        report["small"] = {"first": first.written, "resumed": [resumed.written, resumed.skipped, resumed.total],
                           "again": [again.written, again.skipped, again.total], "index": again.index}
        exact = ExactRetriever(small.vectors, small.urls, 2.0)
        retriever = MilvusRetriever(server.uri, "small", logit_scale=2.0)
        queries = unit(small.vectors[:8] + 0.05)
        matches = 0
        skip = frozenset({1})
        for got, expected in zip(retriever.search(queries, 3, skip), exact.search(queries, 3, skip), strict=True):
            assert [h.id for h in got] == [h.id for h in expected], (got, expected)
            assert np.allclose([h.score for h in got], [h.score for h in expected], atol=1e-4)
            assert 1 not in [h.id for h in got] and got[0].caption == f"caption {got[0].id}"
            matches += 1
        report["small"]["exact_matches"] = matches
        retriever.close()

        # Above EXACT_BELOW rows: IVF_FLAT, built by the server on the sealed segment; a corpus vector finds itself.
        large = corpus(60_000, 32, seed=1)
        built = ingest(large, server.uri, "large", progress=False)
        client = connect(server.uri)
        index = client.describe_index("large", "vector")
        disconnect(client, server.uri)
        retriever = MilvusRetriever(server.uri, "large")
        picks = np.random.default_rng(2).choice(len(large), 50, replace=False)
        found = [hits[0].id for hits in retriever.search(unit(large.vectors[picks]), 3)]
        report["large"] = {"index": built.index, "nlist": int(index["nlist"]), "indexed": int(index["indexed_rows"]),
                           "total": built.total, "self_found": int(np.sum(np.asarray(found) == large.ids[picks])),
                           "nprobe": retriever._search_params["params"].get("nprobe")}

        # Down: the retriever raises a typed error (the pipeline then generates instead, with a notice).
        query = unit(large.vectors[picks[:1]])
        server.stop()
        try:
            retriever.search(query, 3)
            report["while_down"] = "answered"
        except RetrievalUnavailable as error:
            report["while_down"] = f"RetrievalUnavailable: {error}"
        # And back: the same server restarted on the same folder and port; the same retriever answers again.
        server = milvus_server.start(out / "milvus", port=19530)
        started = time.monotonic()
        report["back"] = None
        while time.monotonic() - started < 120:
            try:
                report["back"] = {"first_hit": retriever.search(query, 3)[0][0].id == int(large.ids[picks[0]]),
                                  "after_s": round(time.monotonic() - started, 1)}
                break
            except RetrievalUnavailable:
                time.sleep(1)
        retriever.close()
    finally:
        server.stop()
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
