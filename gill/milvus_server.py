"""A Milvus standalone server on this machine, for CC3M-scale retrieval (issue 12).

milvus-lite, the embedded default, keeps every row of a collection in one growing segment and scans a fixed
fraction of it per search: 22 ms at 3.3M rows on 2 cores. A Milvus server seals segments and indexes each
(IVF_FLAT, nlist 1024), so the search's nprobe applies: 7.6 ms at 3.3M rows, recall@3 0.994, on the same cores
(docs/benchmarks.md). This module runs one from the ``milvus`` wheel (``pip install 'gill[milvus-server]'``):
Milvus 2.3.5 standalone, one process with embedded etcd, local storage and RocksMQ, no Docker. The retrieval code
is the same for it as for any server or cluster: ``--db`` / ``--milvus-uri http://127.0.0.1:19530``.

Milvus 2.3 listens on every interface (it has no listen-address setting): keep its ports (19530 and the
internal ones near 53100, 13333, 21121-21124, 19529-19531, 9091) behind a firewall, or run it in a container or
network namespace. The tests run it in a network namespace with loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gill.errors import InputError

DEFAULT_PORT = 19530
STOP_GRACE_S = 30.0  # SIGTERM first: Milvus flushes and closes its stores; killed after this


@dataclass
class LocalMilvus:
    """A running server: its ``uri`` for :func:`gill.milvus.connect`, its folder and process id."""

    uri: str
    data_dir: Path
    pid: int
    _server: Any

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        return int(self._server.server_proc.wait())

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`); idempotent."""
        process = self._server.server_proc
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._server.server_proc = None
        self._server.stop()  # closes its log files


def start(data_dir: str | Path, port: int = DEFAULT_PORT, timeout_s: float = 180.0,
          segment_mb: int | None = None) -> LocalMilvus:
    """Start Milvus standalone with its data, logs and binaries under ``data_dir`` and the client port ``port``;
    returns once it answers its health check. ``segment_mb``: sealed segments' maximum size (Milvus' default
    when None). Raises :class:`InputError` saying what to do when it cannot."""
    try:
        from milvus import MilvusServer, __version__
    except ImportError:
        raise InputError("the local Milvus server needs the milvus wheel: pip install 'gill[milvus-server]' "
                         "(or run Milvus in Docker and pass its http:// URI)") from None
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = MilvusServer()
    server.config.try_bind_port = _probe_port
    server.set_base_dir(str(data_dir))
    # This port or an error: left to itself the wheel moves the server to the next free port, and clients of a
    # restarted server kept failing at the old one. The internal ports are found free from their defaults up.
    server.listen_port = port
    server.config.update(proxy_port=port)
    if segment_mb is not None:
        server.config.set("dataCoord.segment.maxSize", int(segment_mb))
    try:
        server.wait_for_started = False
        server.start()
        uri = f"http://127.0.0.1:{server.listen_port}"
        _wait_serving(server, uri, time.monotonic() + timeout_s)
    except (RuntimeError, TimeoutError, OSError) as error:
        with contextlib.suppress(Exception):
            LocalMilvus("", data_dir, 0, server).stop()
        raise InputError(f"Milvus {__version__} did not start: {error}; its logs are in {data_dir / 'logs'} "
                         f"(is port {port} free?)") from None
    return LocalMilvus(uri, data_dir, server.server_proc.pid, server)


def _probe_port(port: int) -> socket.socket | None:
    """The wheel's check that ``port`` is free, with ``SO_REUSEADDR`` as Milvus' own listeners have: without it,
    connections of a stopped server still in TIME_WAIT made its port look taken for a minute after any restart."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _wait_serving(server: Any, uri: str, deadline: float) -> None:
    """Until its health check passes and then a client can list collections (after a restart the proxy
    answers a few seconds after the health check does)."""
    from gill.milvus import connect, disconnect

    healthy = False
    while True:
        code = server.server_proc.poll()
        if code is not None:
            raise RuntimeError(f"it exited with code {code}")
        try:
            if not healthy:
                server.wait_started(timeout=2000)  # the wheel's health check, in short steps to notice an exit
                healthy = True
            client = connect(uri)
            try:
                client.list_collections()
                return
            finally:
                disconnect(client, uri)
        except Exception as error:  # the health check's TimeoutError, RetrievalUnavailable, pymilvus' own
            if time.monotonic() > deadline:
                raise TimeoutError(f"not serving by the deadline ({error})") from None
            time.sleep(0.5)


@contextlib.contextmanager
def running(data_dir: str | Path, port: int = DEFAULT_PORT, segment_mb: int | None = None) -> Iterator[LocalMilvus]:
    """``with running(folder) as milvus:`` a server for the block, stopped after it."""
    server = start(data_dir, port, segment_mb=segment_mb)
    try:
        yield server
    finally:
        server.stop()
