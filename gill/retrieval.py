"""Retrieval of corpus images by the text-side ``[IMG0]`` vector.

:class:`Retriever` is the interface the pipeline and the serving models use; :class:`ExactRetriever`
is the reference's method (a brute-force product with the whole matrix), in memory. A Milvus-backed
retriever implements the same interface.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from gill.convert import EMBEDDINGS_FILE
from gill.errors import CheckpointError, GillError, InputError
from gill.fetch import ImageFetcher
from gill.images import load_image

CAPTIONS_FILE = "retrieval_captions.json"


@dataclass(frozen=True)
class Hit:
    """One corpus entry: its row id, where the image is, and ``exp(logit_scale) * cosine`` as the score."""

    id: int
    url: str
    score: float
    caption: str | None = None


class Retriever(Protocol):
    def search(self, vectors: np.ndarray, k: int, exclude: frozenset[int] = frozenset()) -> list[list[Hit]]:
        """``[N, D]`` unit query vectors -> for each, up to ``k`` hits by descending score, ``exclude`` left out."""
        ...


class ExactRetriever:
    """Exact inner-product search over an in-memory matrix (the reference's method).

    ``embeddings`` are the raw ``[N, D]`` image-side vectors; as the reference, rows are L2-normalised and
    multiplied by ``exp(logit_scale)`` once, so a score is the model's similarity logit.
    """

    def __init__(self, embeddings: np.ndarray, urls: list[str], logit_scale: float,
                 captions: dict[str, str] | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(urls):
            raise CheckpointError(f"retrieval embeddings {embeddings.shape} do not match {len(urls)} urls")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self.matrix = (embeddings / np.maximum(norms, 1e-12) * math.exp(logit_scale)).astype(np.float32)
        self.urls = urls
        self.captions = captions or {}

    @classmethod
    def from_checkpoint(cls, directory: Path, logit_scale: float) -> ExactRetriever | None:
        path = directory / EMBEDDINGS_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            embeddings, urls = data["embeddings"], [str(u) for u in data["urls"]]
        captions_path = directory / CAPTIONS_FILE
        captions = json.loads(captions_path.read_text()) if captions_path.exists() else None
        return cls(embeddings, urls, logit_scale, captions)

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def search(self, vectors: np.ndarray, k: int, exclude: frozenset[int] = frozenset()) -> list[list[Hit]]:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"query vectors must be [N, {self.dim}], got {list(vectors.shape)}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        scores = vectors @ self.matrix.T  # [N, corpus]
        if exclude:
            scores[:, list(exclude)] = -np.inf
        results = []
        for row in scores:
            count = min(k, int(np.isfinite(row).sum()))
            top = np.argpartition(-row, count - 1)[:count] if count else np.array([], dtype=int)
            top = top[np.argsort(-row[top], kind="stable")]
            results.append([Hit(int(i), self.urls[i], float(row[i]), self.captions.get(self.urls[i])) for i in top])
        return results


class RetrievalUnavailable(GillError):
    """The retrieval backend (Milvus) cannot be reached or has no corpus; the message says where and what to do."""


class RetrievalFailed(GillError):
    """Hits were found but none of their images could be loaded; the message gives each one's reason."""


def _is_url(location: str) -> bool:
    return "://" in location


class ImageStore:
    """Loads the image behind a hit: a path relative to ``root`` (the checkpoint, or a local copy of the corpus
    images), an absolute path, or an ``http(s)`` URL fetched by ``fetcher`` under its policy (timeout, size,
    image types, no private addresses). Without a fetcher, URLs are not fetched."""

    def __init__(self, root: Path | None, fetcher: ImageFetcher | None = None) -> None:
        self.root = root
        self.fetcher = fetcher

    def load(self, location: str) -> Image.Image:
        """The image at a local ``location``; raises :class:`RetrievalFailed` with the reason."""
        path = Path(location)
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        if not path.is_file():
            raise RetrievalFailed(f"{location}: no such file under {self.root}")
        try:
            return load_image(path, what=location)
        except InputError as error:
            raise RetrievalFailed(str(error)) from None

    def first(self, hits: list[Hit]) -> tuple[Hit, Image.Image]:
        """The best-ranked hit whose image loads, and the image. URLs of consecutive hits are fetched
        concurrently. Raises :class:`RetrievalFailed` listing why each hit failed (CC3M URLs rot)."""
        failures: list[str] = []
        position = 0
        while position < len(hits):
            hit = hits[position]
            if not _is_url(hit.url):
                position += 1
                try:
                    return hit, self.load(hit.url)
                except RetrievalFailed as error:
                    failures.append(str(error))
                continue
            run = []
            while position + len(run) < len(hits) and _is_url(hits[position + len(run)].url):
                run.append(hits[position + len(run)])
            found = self._first_url(run, failures)
            if found is not None:
                return found
            position += len(run)
        raise RetrievalFailed(f"none of the top {len(hits)} images could be loaded: " + "; ".join(failures))

    def _first_url(self, run: list[Hit], failures: list[str]) -> tuple[Hit, Image.Image] | None:
        if self.fetcher is None:
            failures.extend(f"{hit.url}: URLs are not fetched (no fetcher configured)" for hit in run)
            return None
        while run:
            reasons: list[tuple[str, str]] = []
            result = self.fetcher.first([hit.url for hit in run], reasons)
            if result is None:
                failures.extend(f"{url}: {reason}" for url, reason in reasons)
                return None
            failures.extend(f"{url}: {reason}" for url, reason in result.failures)
            try:
                return run[result.index], load_image(result.data, what=result.url)
            except InputError as error:
                failures.append(str(error))
                run = run[result.index + 1:]
        return None


# The reference tries its top 3 hits in order until one image loads (dead CC3M URLs are common).
RETRIEVAL_CANDIDATES = 3


def first_loadable(retriever: Retriever, store: ImageStore, query: np.ndarray, exclude: frozenset[int],
                   candidates: int = RETRIEVAL_CANDIDATES) -> tuple[Hit, Image.Image] | None:
    """The best of the top ``candidates`` hits for a ``[1, D]`` query whose image loads; None when the search
    finds nothing. Raises :class:`RetrievalFailed` when no hit's image loads, :class:`RetrievalUnavailable` when
    the backend is down."""
    hits = retriever.search(query, candidates, exclude)[0]
    return store.first(hits) if hits else None
