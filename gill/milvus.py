"""CC3M retrieval vectors in a Milvus collection: ingest (validated, batched, idempotent, resumable) and search.

One code path for both deployments, chosen by the URI (pymilvus' own switch):

* ``path/to/retrieval.db``: milvus-lite, embedded (the default, ``retrieval.db`` in the checkpoint folder). One
  process owns a ``.db`` file at a time: serve it from one ``retrieval`` model instance, or use a server.
* ``http://host:19530``: a Milvus server or cluster.

Rows hold the L2-normalised image-side vectors; a search scores inner products and multiplies them by
``exp(logit_scale)``, so a score equals the reference's (which scales the matrix by ``exp(logit_scale)`` and
takes a product with it). Ids are the row numbers of the official file (or the ``ids`` of an open-format one).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gill.errors import InputError
from gill.retrieval import Hit, RetrievalUnavailable

DEFAULT_COLLECTION = "gill_cc3m"
DB_FILE = "retrieval.db"
MAX_URL = 2048  # VARCHAR lengths; longer values are refused at ingest, not truncated
MAX_CAPTION = 1024
# Inserts of ~20,000 256-d rows in one call stalled milvus-lite for minutes (issue 12): batch by bytes.
BATCH_BYTES = 2 * 1024 * 1024
EXACT_BELOW = 50_000  # rows: a FLAT (exact) index is fast enough and needs no training
IVF_NLIST = 1024  # per sealed segment (see index_params)


@dataclass(frozen=True)
class Corpus:
    """Rows to ingest: ``ids`` ``[N] int64`` (unique, >= 0), ``urls``, ``captions`` ('' when unknown) and
    ``vectors`` ``[N, D] float32`` as given (normalised at ingest)."""

    ids: np.ndarray
    urls: list[str]
    captions: list[str]
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.urls)


def read_corpus(path: str | Path, captions: str | Path | None = None) -> Corpus:
    """Read and validate a corpus file; raises :class:`InputError` saying what is wrong.

    Rows without a caption take theirs from ``captions`` (JSON ``{url: caption}``), by default
    ``retrieval_captions.json`` beside the file when it exists.

    * ``.npy``: the official ``cc3m_embeddings_urls.npy`` (a pickled dict of ``paths`` and ``embeddings``),
      read with an unpickler that only rebuilds arrays (no code runs);
    * ``.npz``: ``vectors`` (or ``embeddings``) ``[N, D]`` and ``urls`` ``[N]``, optional ``ids`` and ``captions``;
      read with ``allow_pickle=False``;
    * ``.parquet``: columns ``url``, ``vector`` (list of floats), optional ``id`` and ``caption`` (needs pyarrow).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        from gill.convert import load_embeddings_pickle
        from gill.errors import CheckpointError

        try:
            urls, vectors = load_embeddings_pickle(path)
        except CheckpointError as error:
            raise InputError(str(error)) from None
        corpus = Corpus(np.arange(len(urls), dtype=np.int64), urls, [""] * len(urls), vectors)
    elif suffix == ".npz":
        corpus = _read_npz(path)
    elif suffix == ".parquet":
        corpus = _read_parquet(path)
    else:
        raise InputError(f"{path}: unknown corpus format {suffix!r}; use the official cc3m_embeddings_urls.npy, "
                         f"or .npz / .parquet with ids, urls, captions and vectors")
    captions_file = Path(captions) if captions is not None else path.parent / "retrieval_captions.json"
    if captions is not None and not captions_file.is_file():
        raise InputError(f"{captions_file}: no such captions file")
    if captions_file.is_file() and not all(corpus.captions):
        import json

        try:
            mapping = json.loads(captions_file.read_text())
        except ValueError as error:
            raise InputError(f"{captions_file}: not JSON ({error})") from None
        if not isinstance(mapping, dict):
            raise InputError(f"{captions_file}: expected a JSON object {{url: caption}}")
        filled = [c or str(mapping.get(u, "")) for u, c in zip(corpus.urls, corpus.captions, strict=True)]
        corpus = Corpus(corpus.ids, corpus.urls, filled, corpus.vectors)
    validate(corpus, str(path))
    return corpus


def _read_npz(path: Path) -> Corpus:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            key = "vectors" if "vectors" in names else "embeddings" if "embeddings" in names else None
            if key is None or "urls" not in names:
                raise InputError(f"{path}: an .npz corpus needs 'vectors' (or 'embeddings') and 'urls'; "
                                 f"it has {sorted(names)}")
            vectors = np.asarray(data[key])
            urls = [str(u) for u in data["urls"]]
            ids = np.asarray(data["ids"]) if "ids" in names else np.arange(len(urls))
            captions = [str(c) for c in data["captions"]] if "captions" in names else [""] * len(urls)
    except ValueError as error:  # object arrays need pickle: refused
        raise InputError(f"{path}: not a plain-array .npz ({error}); store strings as unicode arrays") from None
    return Corpus(ids, urls, captions, vectors)


def _read_parquet(path: Path) -> Corpus:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to .npz") from None
    table = parquet.read_table(path)
    columns = set(table.column_names)
    if not {"url", "vector"} <= columns:
        raise InputError(f"{path}: a parquet corpus needs columns 'url' and 'vector'; it has {sorted(columns)}")
    urls = [str(u) for u in table.column("url").to_pylist()]
    try:
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    except ValueError:
        raise InputError(f"{path}: 'vector' rows differ in length; every vector needs the same dimension") from None
    ids = np.asarray(table.column("id").to_pylist()) if "id" in columns else np.arange(len(urls))
    captions = [str(c or "") for c in table.column("caption").to_pylist()] if "caption" in columns else [""] * len(urls)
    return Corpus(ids, urls, captions, vectors)


def validate(corpus: Corpus, what: str) -> None:
    """Check shapes, ids, text lengths and that every vector is finite and non-zero; raises :class:`InputError`."""
    vectors, count = corpus.vectors, len(corpus.urls)
    if vectors.ndim != 2 or vectors.shape[0] != count or vectors.shape[1] < 1:
        raise InputError(f"{what}: vectors are {list(vectors.shape)}, expected [{count}, D] for {count} urls")
    if not np.issubdtype(vectors.dtype, np.number):
        raise InputError(f"{what}: vectors must be numbers, got {vectors.dtype}")
    if count == 0:
        raise InputError(f"{what}: the corpus is empty")
    if corpus.ids.shape != (count,) or not np.issubdtype(corpus.ids.dtype, np.integer):
        raise InputError(f"{what}: ids must be {count} integers, got {corpus.ids.dtype} {list(corpus.ids.shape)}")
    if (corpus.ids < 0).any() or len(np.unique(corpus.ids)) != count:
        raise InputError(f"{what}: ids must be unique and >= 0")
    if len(corpus.captions) != count:
        raise InputError(f"{what}: {len(corpus.captions)} captions for {count} urls")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise InputError(f"{what}: {bad.size} vectors contain NaN or infinity (first at row {int(bad[0])})")
    zero = np.flatnonzero(np.linalg.norm(vectors.astype(np.float64), axis=1) == 0)
    if zero.size:
        raise InputError(f"{what}: {zero.size} vectors are all zeros (first at row {int(zero[0])}); they have no "
                         f"direction to search by")
    for name, values, limit in (("url", corpus.urls, MAX_URL), ("caption", corpus.captions, MAX_CAPTION)):
        long = next((i for i, v in enumerate(values) if len(v.encode()) > limit), None)
        if long is not None:
            raise InputError(f"{what}: row {long} has a {name} over {limit} bytes")
    empty = next((i for i, u in enumerate(corpus.urls) if not u), None)
    if empty is not None:
        raise InputError(f"{what}: row {empty} has an empty url")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Returns ``[N, D] float32`` rows scaled to unit L2 norm."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def default_uri(checkpoint: str | Path) -> str:
    """The embedded milvus-lite file of a checkpoint: ``<checkpoint>/retrieval.db``."""
    return str(Path(checkpoint) / DB_FILE)


def connect(uri: str) -> Any:
    """Returns a ``pymilvus.MilvusClient`` for ``uri`` (a ``.db`` path: milvus-lite; ``http://host:port``: a
    server). Raises :class:`RetrievalUnavailable` saying what to do when it cannot connect."""
    if uri.endswith(".db"):
        parent = Path(uri).resolve().parent
        if not parent.is_dir():
            raise RetrievalUnavailable(f"{uri}: folder {parent} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # milvus-lite imports pkg_resources, which warns on import
            from pymilvus import MilvusClient

            # A connection of its own (pymilvus shares one per address by default): closing one client, as a
            # retriever does after a failed search, never touches another's.
            return MilvusClient(uri=uri, timeout=10, dedicated=True)
    except Exception as error:  # pymilvus raises its own and grpc errors
        raise RetrievalUnavailable(f"cannot reach Milvus at {uri}: {error} (start the server, or give a .db path "
                                   f"for the embedded milvus-lite)") from None


def disconnect(client: Any, uri: str) -> None:
    """Close ``client`` and, for a ``.db`` URI, stop the embedded milvus-lite so another process may open the
    file (it holds the file's lock until stopped)."""
    with contextlib.suppress(Exception):
        client.close()
    if uri.endswith(".db"):
        with contextlib.suppress(Exception):
            from milvus_lite.server_manager import server_manager_instance

            if str(Path(uri).resolve()) in server_manager_instance._servers:
                server_manager_instance.release_server(uri)


def _schema(dim: int) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description="GILL retrieval corpus: unit image vectors (inner product)")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("url", DataType.VARCHAR, max_length=MAX_URL)
    schema.add_field("caption", DataType.VARCHAR, max_length=MAX_CAPTION)
    return schema


def collection_dim(client: Any, collection: str) -> int:
    """Returns the vector dimension of an existing collection."""
    for field in client.describe_collection(collection)["fields"]:
        if field["name"] == "vector":
            return int(field["params"]["dim"])
    raise RetrievalUnavailable(f"collection {collection!r} has no 'vector' field; was it made by gill ingest?")


def index_params(rows: int) -> tuple[str, dict[str, int]]:
    """The index for a collection of ``rows``: FLAT (exact) below :data:`EXACT_BELOW`, else IVF_FLAT, nlist 1024.

    A Milvus server indexes each sealed segment on its own (512 MB by default: about 255k rows of the corpus's
    schema), so nlist is sized for a segment, not the collection: 1024 is about 2 sqrt(255k). The usual
    4 sqrt(rows) (4096 per segment) trains k-means about 4x longer for no recall gain at nprobe 16 (600k rows on
    2 cores: 882 s vs 199 s to index, recall@3 1.0 both; docs/benchmarks.md). milvus-lite ignores both (issue 12)."""
    if rows < EXACT_BELOW:
        return "FLAT", {}
    return "IVF_FLAT", {"nlist": IVF_NLIST}


def default_nprobe(nlist: int) -> int:
    """Lists searched per query and segment: 1/128 of ``nlist`` (8 at 1024), at least 8. Measured with
    bench/retrieval.py at 3.3M rows on a Milvus server (2 cores): nprobe 8 7.6 ms at recall@3 0.994, nprobe 16
    10.0 ms at 1.000, nprobe 4 6.9 ms at 0.947."""
    return max(8, nlist // 128)


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did: ``rows`` in the file, rows ``written`` now, rows already there (``skipped``),
    the collection's size after, and seconds spent inserting and indexing."""

    rows: int
    written: int
    skipped: int
    total: int
    insert_s: float
    index_s: float
    index: str


def _batches(count: int, dim: int, batch_bytes: int) -> Iterator[slice]:
    step = max(1, batch_bytes // (4 * dim + 256))
    for start in range(0, count, step):
        yield slice(start, min(count, start + step))


def ingest(corpus: Corpus, uri: str, collection: str = DEFAULT_COLLECTION, batch_bytes: int = BATCH_BYTES,
           progress: bool = True) -> IngestReport:
    """Write ``corpus`` into ``collection`` at ``uri``, then build the index and load the collection.

    Vectors are normalised. Batches whose ids are all present already are skipped and partly present ones are
    upserted, so re-running writes no duplicates and an interrupted ingest resumes where it stopped. Raises
    :class:`InputError` when the collection exists with another dimension.
    """
    client = connect(uri)
    try:
        return _ingest(client, corpus, uri, collection, batch_bytes, progress)
    finally:
        disconnect(client, uri)


def _ingest(client: Any, corpus: Corpus, uri: str, collection: str, batch_bytes: int, progress: bool) -> IngestReport:
    from tqdm import tqdm

    dim = corpus.vectors.shape[1]
    if client.has_collection(collection):
        existing = collection_dim(client, collection)
        if existing != dim:
            raise InputError(f"collection {collection!r} at {uri} holds {existing}-d vectors; this corpus is {dim}-d "
                             f"(use another --collection, or drop it)")
    else:
        client.create_collection(collection, schema=_schema(dim))
    # The index is declared and the collection loaded before the first insert: a Milvus server answers queries
    # (the resume check below) only on a loaded collection, and loads only an indexed one. It then indexes each
    # segment as it seals; milvus-lite indexes its one growing segment as rows arrive.
    kind = ensure_index(client, collection, len(corpus))
    client.load_collection(collection)
    order = np.argsort(corpus.ids, kind="stable")
    written = skipped = 0
    started = time.perf_counter()
    with tqdm(total=len(corpus), unit="rows", desc=f"ingest {collection}", disable=not progress,
              unit_scale=True) as bar:
        for part in _batches(len(corpus), dim, batch_bytes):
            rows = order[part]
            ids = corpus.ids[rows]
            present = _present(client, collection, ids)
            if present == len(ids):
                skipped += len(ids)
                bar.update(len(ids))
                continue
            vectors = normalized(corpus.vectors[rows])
            data = [{"id": int(i), "vector": v, "url": corpus.urls[r], "caption": corpus.captions[r]}
                    for i, v, r in zip(ids, vectors.tolist(), rows.tolist())]
            (client.upsert if present else client.insert)(collection, data)
            written += len(ids)
            bar.update(len(ids))
    client.flush(collection)
    insert_s = time.perf_counter() - started
    # count(*) rather than the collection statistics: on a server those still count the rows an upsert replaced.
    total = int(client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
    started = time.perf_counter()
    _wait_indexed(client, collection, total, progress)
    client.load_collection(collection)
    return IngestReport(len(corpus), written, skipped, total, insert_s, time.perf_counter() - started, kind)


def _wait_indexed(client: Any, collection: str, total: int, progress: bool, timeout_s: float = 6 * 3600) -> None:
    """Wait until a server has no rows waiting for an index: it indexes segments in the background as they seal,
    then merges small ones (compaction) and indexes the merged ones again, and a search meanwhile scans
    unindexed segments whole (3.3M rows on 2 cores: 20-22 minutes after the last insert). milvus-lite reports no
    pending rows, so this returns at once."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    with tqdm(total=total, unit="rows", desc=f"index {collection}", disable=not progress, unit_scale=True) as bar:
        while True:
            info = client.describe_index(collection, "vector")
            pending = int(info.get("pending_index_rows", 0))
            bar.n = max(0, total - pending)
            bar.refresh()
            if str(info.get("state", "")) == "Failed":
                reason = info.get("index_state_fail_reason") or info
                raise RetrievalUnavailable(f"Milvus failed to index {collection!r}: {reason}")
            if pending <= 0 or time.monotonic() > deadline:
                return
            time.sleep(1.0)


def _present(client: Any, collection: str, ids: np.ndarray) -> int:
    """How many of ``ids`` the collection holds (one range query when they are consecutive)."""
    low, high = int(ids.min()), int(ids.max())
    if high - low + 1 == len(ids):
        expression = f"id >= {low} and id <= {high}"
    else:
        expression = f"id in [{','.join(str(int(i)) for i in ids)}]"
    result = client.query(collection, filter=expression, output_fields=["count(*)"])
    return int(result[0]["count(*)"])


def ensure_index(client: Any, collection: str, rows: int) -> str:
    """Build the vector index when the collection has none; returns its type."""
    if "vector" in client.list_indexes(collection):
        return str(client.describe_index(collection, "vector")["index_type"])
    kind, params = index_params(rows)
    spec = client.prepare_index_params()
    spec.add_index(field_name="vector", index_type=kind, metric_type="IP", params=params)
    client.create_index(collection, spec)
    return kind


class MilvusRetriever:
    """:class:`~gill.retrieval.Retriever` over a Milvus collection made by :func:`ingest`.

    Scores are ``exp(logit_scale) * cosine``, as the reference's. A lost connection raises
    :class:`RetrievalUnavailable`; the next search connects again, so service resumes when Milvus returns.
    """

    def __init__(self, uri: str, collection: str = DEFAULT_COLLECTION, logit_scale: float = 0.0,
                 nprobe: int | None = None) -> None:
        self.uri, self.collection = uri, collection
        self.scale = math.exp(logit_scale)
        self._nprobe = nprobe
        self._client: Any = None
        self._search_params: dict[str, Any] = {}
        self.dim = 0

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        client = connect(self.uri)
        try:
            if not client.has_collection(self.collection):
                raise RetrievalUnavailable(f"Milvus at {self.uri} has no collection {self.collection!r}; "
                                           f"run: gill ingest cc3m_embeddings_urls.npy --db {self.uri}")
            self.dim = collection_dim(client, self.collection)
            index = client.describe_index(self.collection, "vector") if "vector" in client.list_indexes(
                self.collection) else {}
            params = {}
            if index.get("index_type") == "IVF_FLAT":
                params["nprobe"] = self._nprobe or default_nprobe(int(index["nlist"]))
            self._search_params = {"metric_type": "IP", "params": params}
            client.load_collection(self.collection)
        except RetrievalUnavailable:
            raise
        except Exception as error:
            raise RetrievalUnavailable(f"Milvus at {self.uri}: {error}") from None
        self._client = client
        return client

    def search(self, vectors: np.ndarray, k: int, exclude: frozenset[int] = frozenset()) -> list[list[Hit]]:
        """``[N, D]`` unit query vectors -> for each, up to ``k`` hits by descending score, ``exclude`` left out."""
        client = self._connect()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"query vectors must be [N, {self.dim}], got {list(vectors.shape)}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        expression = f"id not in [{','.join(str(int(i)) for i in sorted(exclude))}]" if exclude else ""
        try:
            results = client.search(self.collection, data=vectors.tolist(), limit=k, filter=expression,
                                    search_params=self._search_params, output_fields=["url", "caption"])
        except Exception as error:
            self.close()
            raise RetrievalUnavailable(f"search on Milvus at {self.uri} failed: {error}") from None
        return [[Hit(int(h["id"]), h["entity"]["url"], float(h["distance"]) * self.scale,
                     h["entity"]["caption"] or None) for h in row] for row in results]

    def close(self) -> None:
        """Drop the connection (the next search connects again)."""
        client, self._client = self._client, None
        if client is not None:
            disconnect(client, self.uri)
