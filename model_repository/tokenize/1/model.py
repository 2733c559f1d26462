"""tokenize: TEXT [1] -> INPUT_IDS [T] (BOS first) and FORCE_IMAGE [1] = true, for the text-to-image path."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.config import GILLArgs, resolve_source  # noqa: E402
from gill.errors import InputError  # noqa: E402
from gill.serving import backend  # noqa: E402
from gill.tokens import load_tokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        checkpoint = backend.parameters(args)["checkpoint"]
        gill_args = GILLArgs.load(checkpoint)
        source = resolve_source(gill_args.tokenizer or gill_args.opt_version, checkpoint)
        self.tokenizer, _ = load_tokenizer(source, gill_args.num_tokens)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = backend.scalar(request, "TEXT", "")
                if not text.strip():
                    raise InputError("TEXT is empty: give a description of the image")
                ids = self.tokenizer(text, return_tensors="np").input_ids[0].astype(np.int64)
                responses.append(pb_utils.InferenceResponse([
                    backend.tensor("INPUT_IDS", ids), backend.tensor("FORCE_IMAGE", np.array([True]))]))
            except Exception as error:
                responses.append(backend.error_response(error))
        return responses
