"""clip: encoded image bytes [B, 1] -> PREFIX [B, n_visual_tokens, D] and RETRIEVAL_VECTOR [B, 256]."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.images import load_image  # noqa: E402
from gill.model import GILL  # noqa: E402
from gill.serving import backend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.model = GILL.from_checkpoint(backend.parameters(args)["checkpoint"], backend.device(args),
                                          parts=("vision",))

    def execute(self, requests):
        responses = [None] * len(requests)
        images, owners = [], []
        for index, request in enumerate(requests):
            try:
                rows = backend.required_input(request, "IMAGE").reshape(-1)
                images.extend(load_image(bytes(row), what=f"image {row_index}") for row_index, row in enumerate(rows))
                owners.append((index, len(rows)))
            except Exception as error:
                responses[index] = backend.error_response(error)
        if images:
            prefix, vectors = self.model.encode_images(images)
            start = 0
            for index, count in owners:
                responses[index] = pb_utils.InferenceResponse([
                    backend.tensor("PREFIX", prefix[start:start + count]),
                    backend.tensor("RETRIEVAL_VECTOR", vectors[start:start + count])])
                start += count
        return responses
