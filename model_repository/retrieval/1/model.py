"""retrieval: QUERY [256] -> the top-k hits with their image bytes, from the configured retriever."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.checkpoint import load_logit_scale  # noqa: E402
from gill.errors import CheckpointError, InputError  # noqa: E402
from gill.images import png_bytes  # noqa: E402
from gill.retrieval import RETRIEVAL_CANDIDATES, ExactRetriever, ImageStore  # noqa: E402
from gill.serving import backend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = backend.parameters(args)
        checkpoint = Path(params["checkpoint"])
        if params.get("retriever", "exact") != "exact":
            raise CheckpointError(f"retriever {params['retriever']!r} is not available; use 'exact'")
        self.retriever = ExactRetriever.from_checkpoint(checkpoint, load_logit_scale(checkpoint))
        self.store = ImageStore(checkpoint)
        self.max_top_k = int(params.get("max_top_k", "32"))

    def execute(self, requests):
        return [self._serve(request) for request in requests]

    def _serve(self, request):
        try:
            if self.retriever is None:
                raise InputError("this checkpoint has no retrieval embeddings (retrieval_embeddings.npz)")
            query = backend.required_input(request, "QUERY").astype(np.float32).reshape(1, -1)
            top_k = int(backend.scalar(request, "TOP_K", RETRIEVAL_CANDIDATES))
            if not 1 <= top_k <= self.max_top_k:
                raise InputError(f"TOP_K={top_k} (allowed: 1 to {self.max_top_k})")
            exclude = backend.optional_input(request, "EXCLUDE")
            excluded = frozenset(int(i) for i in exclude.reshape(-1)) if exclude is not None else frozenset()
            hits = self.retriever.search(query, top_k, excluded)[0]
            images = []
            for hit in hits:
                image = self.store.load(hit.url)
                images.append(png_bytes(image) if image is not None else b"")
            return pb_utils.InferenceResponse([
                backend.tensor("IDS", np.array([h.id for h in hits], dtype=np.int64)),
                backend.tensor("SCORES", np.array([h.score for h in hits], dtype=np.float32)),
                backend.bytes_tensor("URLS", [h.url.encode() for h in hits]),
                backend.bytes_tensor("CAPTIONS", [(h.caption or "").encode() for h in hits]),
                backend.bytes_tensor("IMAGES", images)])
        except Exception as error:
            return backend.error_response(error)
