"""Which retriever and image store a deployment uses: settings (Triton model parameters or CLI options) in,
a :class:`~gill.retrieval.Retriever` and an :class:`~gill.retrieval.ImageStore` out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gill.convert import EMBEDDINGS_FILE
from gill.errors import InputError
from gill.fetch import FetchPolicy, ImageFetcher
from gill.retrieval import ExactRetriever, ImageStore, Retriever

RETRIEVERS = ("auto", "exact", "milvus", "none")


@dataclass(frozen=True)
class RetrievalSettings:
    """How retrieval is served. ``retriever``: ``milvus`` (the collection at ``milvus_uri``, default
    ``<checkpoint>/retrieval.db``), ``exact`` (the reference's in-memory product over
    ``retrieval_embeddings.npz``), ``none``, or ``auto`` (milvus when a URI is given or ``retrieval.db`` exists,
    else exact when the embeddings exist, else none). Images load from ``image_root`` (default: the checkpoint)
    for relative paths and, when ``fetch_urls``, from their URLs under the fetch limits."""

    retriever: str = "auto"
    milvus_uri: str = ""
    collection: str = "gill_cc3m"
    nprobe: int = 0  # 0: the default for the index (gill.milvus.default_nprobe)
    image_root: str = ""
    fetch_urls: bool = True
    allow_private_urls: bool = False
    fetch_timeout_s: float = 5.0
    fetch_max_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.retriever not in RETRIEVERS:
            raise InputError(f"retriever {self.retriever!r}: allowed {list(RETRIEVERS)}")
        if self.nprobe < 0:
            raise InputError(f"nprobe must be >= 0 (0: the index's default), got {self.nprobe}")

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> RetrievalSettings:
        """Settings from string parameters (a Triton model config); unknown keys are ignored, bad values raise
        :class:`InputError` naming the key."""
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = parameters.get(field.name)
            if raw is None or raw == "":
                continue
            try:
                if field.type == "bool":
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    values[field.name] = raw.lower() in ("true", "1", "yes")
                elif field.type == "int":
                    values[field.name] = int(raw)
                elif field.type == "float":
                    values[field.name] = float(raw)
                else:
                    values[field.name] = raw
            except ValueError:
                raise InputError(f"parameter {field.name}={raw!r} is not a {field.type}") from None
        return cls(**values)  # type: ignore[arg-type]


def open_retrieval(checkpoint: str | Path, logit_scale: float,
                   settings: RetrievalSettings | None = None) -> tuple[Retriever | None, ImageStore]:
    """The retriever (None when retrieval is off or there is no corpus) and the image store ``settings`` ask
    for. A Milvus retriever connects on its first search, so a server that is down does not stop start-up."""
    settings = settings or RetrievalSettings()
    checkpoint = Path(checkpoint)
    uri = settings.milvus_uri or str(checkpoint / "retrieval.db")
    kind = settings.retriever
    if kind == "auto":
        if settings.milvus_uri or (checkpoint / "retrieval.db").exists():
            kind = "milvus"
        elif (checkpoint / EMBEDDINGS_FILE).exists():
            kind = "exact"
        else:
            kind = "none"
    retriever: Retriever | None = None
    if kind == "milvus":
        from gill.milvus import MilvusRetriever

        retriever = MilvusRetriever(uri, settings.collection, logit_scale, settings.nprobe or None)
    elif kind == "exact":
        retriever = ExactRetriever.from_checkpoint(checkpoint, logit_scale)
    fetcher = None
    if settings.fetch_urls:
        fetcher = ImageFetcher(FetchPolicy(timeout_s=settings.fetch_timeout_s, max_bytes=settings.fetch_max_bytes,
                                           allow_private=settings.allow_private_urls))
    root = Path(settings.image_root) if settings.image_root else checkpoint
    return retriever, ImageStore(root, fetcher)


def describe(retriever: Retriever | None) -> str:
    """A one-line description of a retriever for logs: its kind and where its corpus is."""
    if retriever is None:
        return "off (no corpus)"
    uri = getattr(retriever, "uri", None)
    if uri is not None:
        return f"milvus {uri} collection {getattr(retriever, 'collection', '?')}"
    return f"exact, in memory ({type(retriever).__name__})"
