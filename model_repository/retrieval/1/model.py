"""retrieval: QUERY [256] -> the top-k hits, with the image of the best one that loads, from the configured
retriever (Milvus or the in-memory product; gill.corpus.RetrievalSettings reads the parameters)."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.checkpoint import load_logit_scale  # noqa: E402
from gill.corpus import RetrievalSettings, describe, open_retrieval  # noqa: E402
from gill.errors import InputError  # noqa: E402
from gill.images import png_bytes  # noqa: E402
from gill.retrieval import RETRIEVAL_CANDIDATES, RetrievalFailed  # noqa: E402
from gill.serving import backend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        checkpoint = Path(params["checkpoint"])
        settings = RetrievalSettings.from_parameters(params)
        self.retriever, self.store = open_retrieval(checkpoint, load_logit_scale(checkpoint), settings)
        self.max_top_k = int(params.get("max_top_k", "32"))
        pb_utils.Logger.log_info(f"retrieval: {describe(self.retriever)}; images from {self.store.root}"
                                 f"{' and URLs' if self.store.fetcher else ''}")

    def execute(self, requests):
        return [self._serve(request) for request in requests]

    def _serve(self, request):
        try:
            query = backend.required_input(request, "QUERY").astype(np.float32).reshape(1, -1)
            top_k = int(backend.scalar(request, "TOP_K", RETRIEVAL_CANDIDATES))
            if not 1 <= top_k <= self.max_top_k:
                raise InputError(f"TOP_K={top_k} (allowed: 1 to {self.max_top_k})")
            exclude = backend.optional_input(request, "EXCLUDE")
            excluded = frozenset(int(i) for i in exclude.reshape(-1)) if exclude is not None else frozenset()
            # No corpus configured: no hits (the turn generates instead); a backend that is down raises
            # RetrievalUnavailable, which the orchestrator turns into a notice.
            hits = self.retriever.search(query, top_k, excluded)[0] if self.retriever is not None else []
            images, failure = [b""] * len(hits), ""
            if hits:
                try:
                    hit, image = self.store.first(hits)
                    images[hits.index(hit)] = png_bytes(image)
                except RetrievalFailed as error:
                    failure = str(error)
            return pb_utils.InferenceResponse([
                backend.bytes_tensor("FAILURE", [failure.encode()]),
                backend.tensor("IDS", np.array([h.id for h in hits], dtype=np.int64)),
                backend.tensor("SCORES", np.array([h.score for h in hits], dtype=np.float32)),
                backend.bytes_tensor("URLS", [h.url.encode() for h in hits]),
                backend.bytes_tensor("CAPTIONS", [(h.caption or "").encode() for h in hits]),
                backend.bytes_tensor("IMAGES", images)])
        except Exception as error:
            return backend.error_response(error)
