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
from gill.errors import CheckpointError, InputError
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


class ImageStore:
    """Loads the image behind a hit: corpus paths relative to the checkpoint directory, or absolute paths.

    Remote URLs (the CC3M release) are not fetched here: a hit whose image cannot be loaded is skipped.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def load(self, url: str) -> Image.Image | None:
        if "://" in url:
            return None
        path = Path(url)
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        if not path.is_file():
            return None
        try:
            return load_image(path, what=url)
        except InputError:
            return None


# The reference tries its top 3 hits in order until one image loads (dead CC3M URLs are common).
RETRIEVAL_CANDIDATES = 3


def first_loadable(retriever: Retriever, store: ImageStore, query: np.ndarray, exclude: frozenset[int],
                   candidates: int = RETRIEVAL_CANDIDATES) -> tuple[Hit, Image.Image] | None:
    """The best of the top ``candidates`` hits for a ``[1, D]`` query whose image loads, or None."""
    for hit in retriever.search(query, candidates, exclude)[0]:
        image = store.load(hit.url)
        if image is not None:
            return hit, image
    return None
