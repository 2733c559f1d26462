"""mapper: IMG_STATES [B, 8, D] -> RETRIEVAL_VECTOR [B, 256], DECISION_PROBS [B, 2] (p_gen, p_ret;
NaN without a decision head), PROMPT_EMBEDS [B, 77, 768]."""

import contextlib

with contextlib.suppress(ImportError):  # `gill serve` adds the project's environment; Triton images install gill
    import gill_environment  # noqa: F401

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from gill.model import GILL  # noqa: E402
from gill.serving import backend  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.device = backend.device(args)
        self.model = GILL.from_checkpoint(backend.parameters(args)["checkpoint"], self.device, parts=())
        self.decisions = backend.Counter("gill_decisions_total", "Retrieve-or-generate decisions")

    def execute(self, requests):
        responses = [None] * len(requests)
        batches, owners = [], []
        for index, request in enumerate(requests):
            try:
                # On the GPU when the llm left them there (FORCE_CPU_ONLY_INPUT_TENSORS "no" in config.pbtxt).
                batches.append(backend.torch_input(request, "IMG_STATES", self.device))
                owners.append(index)
            except Exception as error:
                responses[index] = backend.error_response(error)
        if not batches:
            return responses
        states = torch.cat(batches)
        wanted = set().union(*(requests[i].requested_output_names() for i in owners))
        outputs = {}
        if "RETRIEVAL_VECTOR" in wanted:
            outputs["RETRIEVAL_VECTOR"] = self.model.text_retrieval_embedding(states)
        if "DECISION_PROBS" in wanted:
            decision = self.model.decide(states)
            for choice in decision.choices:
                self.decisions.add(decision=choice)
            outputs["DECISION_PROBS"] = (decision.probabilities if decision.probabilities is not None
                                         else torch.full((states.shape[0], 2), float("nan")))
        if "PROMPT_EMBEDS" in wanted:  # the mapper transformer runs only for a generation
            outputs["PROMPT_EMBEDS"] = self.model.prompt_embeddings(states)
        start = 0
        for index, batch in zip(owners, batches):
            names = requests[index].requested_output_names()
            count = batch.shape[0]
            responses[index] = pb_utils.InferenceResponse(
                [backend.tensor(name, outputs[name][start:start + count]) for name in names])
            start += count
        return responses
