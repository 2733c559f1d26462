"""One dialogue turn in-process: interleaved images and text in, a stream of typed events out.

Stages: ``build_prompt`` (CLIP prefixes and token embeddings) -> ``Decoder.stream`` (text deltas; on
``[IMG0]`` the 8 ``[IMG]`` states) -> ``_resolve_image`` (decision head; then only the chosen branch:
retrieval from the corpus, or Stable Diffusion on the mapper's prompt embeddings).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from gill.decoding import CancelCheck, Decoder, ImageStates, TokenStep
from gill.diffusion import ImageGenerator
from gill.errors import InputError
from gill.events import DiffusionPreview, Done, Event, ImageRequest, ImageResult, TextDelta
from gill.images import load_image
from gill.model import GILL
from gill.options import GenerationOptions
from gill.retrieval import ExactRetriever, ImageStore, Retriever

Part = str | Image.Image | bytes | Path
RETRIEVAL_CANDIDATES = 3  # the reference tries its top 3 hits in order until one image loads


class _TextStream:
    """Turns token ids into text deltas that never end inside a multi-byte character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


@dataclass
class TurnResult:
    """Everything one turn produced, collected (see :meth:`Pipeline.run`)."""

    text: str
    images: list[ImageResult]
    done: Done
    events: list[Event] = field(default_factory=list)


class Pipeline:
    """GILL with its retriever and image generator; both optional (a missing branch is never chosen)."""

    def __init__(self, model: GILL, retriever: Retriever | None = None, generator: ImageGenerator | None = None,
                 image_store: ImageStore | None = None) -> None:
        self.model = model
        self.decoder = Decoder(model.lm, model.tokens)
        self.retriever = retriever
        self.generator = generator
        self.image_store = image_store or ImageStore(model.directory)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, load_diffusion: bool = True,
                        load_retrieval: bool = True, safety_checker: bool = False) -> Pipeline:
        directory = Path(directory)
        model = GILL.from_checkpoint(directory, device, dtype)
        retriever = None
        if load_retrieval:
            retriever = ExactRetriever.from_checkpoint(directory, float(model.adapters.logit_scale))
        generator = None
        if load_diffusion:
            generator = ImageGenerator.from_checkpoint(model.args, directory, model.device, model.dtype, safety_checker)
        return cls(model, retriever, generator, ImageStore(directory))

    def build_prompt(self, parts: Sequence[Part], options: GenerationOptions) -> tuple[torch.Tensor, int]:
        """Interleaved parts -> (``[T, lm_width]`` prompt embeddings, T). BOS before the first text only."""
        if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
            raise InputError("parts must be a list of text strings and images")
        if not parts:
            raise InputError("empty prompt: give at least one text or image part")
        images, kinds = [], []
        for index, part in enumerate(parts):
            if isinstance(part, str):
                kinds.append("text")
            elif isinstance(part, (Image.Image, bytes, bytearray, Path)):
                images.append(load_image(part, what=f"part {index} (image)"))
                kinds.append("image")
            else:
                raise InputError(f"part {index}: expected text (str) or an image, got {type(part).__name__}")
        if all(kind == "text" and not part for kind, part in zip(kinds, parts, strict=False)):
            raise InputError("empty prompt: every part is an empty string")
        prefixes = self.model.encode_images(images)[0] if images else None
        pieces, image_index, add_bos = [], 0, True
        for kind, part in zip(kinds, parts, strict=False):
            if kind == "image":
                pieces.append(prefixes[image_index])
                image_index += 1
            elif part:
                pieces.append(self.model.embed_tokens(self.model.tokenize(part, add_bos)))
                add_bos = options.always_add_bos
        embeds = torch.cat(pieces, dim=0)
        return embeds, embeds.shape[0]

    def stream(self, parts: Sequence[Part], options: GenerationOptions | None = None,
               cancel: CancelCheck | None = None) -> Iterator[Event]:
        """Run one turn; yields :class:`TextDelta`, :class:`ImageRequest`, :class:`DiffusionPreview`,
        :class:`ImageResult`, then one :class:`Done`. Raises :class:`InputError` before the first event."""
        options = options or GenerationOptions()
        start = time.perf_counter()
        timings: dict[str, float] = {}
        embeds, prompt_tokens = self.build_prompt(parts, options)
        timings["prompt_s"] = time.perf_counter() - start
        text = _TextStream(self.model.tokenizer)
        img_ids = set(self.model.tokens.img)
        generated, images, reason = 0, 0, "length"
        seen: set[int] = set()
        decode_start = time.perf_counter()
        image_time = 0.0
        for step in self.decoder.stream([embeds], options, cancel):
            if isinstance(step, TokenStep):
                token, reason = step.tokens[0], step.finished[0] or reason
                if token is None:
                    continue
                generated += 1
                if "first_token_s" not in timings:
                    timings["first_token_s"] = time.perf_counter() - start
                if token in img_ids or (step.finished[0] in ("eos", "newline")):
                    continue
                delta = text.push(token)
                if delta:
                    yield TextDelta(delta)
            elif isinstance(step, ImageStates):
                states = step.states[0]
                yield ImageRequest(images, states)
                image_start = time.perf_counter()
                yield from self._resolve_image(images, states, options, cancel, seen, timings)
                image_time += time.perf_counter() - image_start
                images += 1
        if cancel is not None and cancel():
            reason = "cancelled"
        timings["decode_s"] = time.perf_counter() - decode_start - image_time
        timings["total_s"] = time.perf_counter() - start
        yield Done(text.emitted, prompt_tokens, generated, reason, timings)

    def run(self, parts: Sequence[Part], options: GenerationOptions | None = None,
            cancel: CancelCheck | None = None, on_event: Callable[[Event], None] | None = None) -> TurnResult:
        """:meth:`stream`, collected; ``on_event`` sees each event as it arrives."""
        events = []
        for event in self.stream(parts, options, cancel):
            events.append(event)
            if on_event is not None:
                on_event(event)
        done = events[-1]
        assert isinstance(done, Done)
        return TurnResult(done.text, [e for e in events if isinstance(e, ImageResult)], done, events)

    def _resolve_image(self, index: int, states: torch.Tensor, options: GenerationOptions,
                       cancel: CancelCheck | None, seen: set[int], timings: dict[str, float]) -> Iterator[Event]:
        batch = states[None]
        decision = self.model.decide(batch)
        choice = decision.choices[0]
        probabilities = None
        if decision.probabilities is not None:
            probabilities = (float(decision.probabilities[0, 0]), float(decision.probabilities[0, 1]))
        query = self.model.text_retrieval_embedding(batch)
        can_retrieve = options.allow_retrieval and self.retriever is not None
        can_generate = options.allow_generation and self.generator is not None
        order = ["ret", "gen"] if choice == "ret" else ["gen", "ret"]
        for branch in order:
            if branch == "ret" and can_retrieve:
                started = time.perf_counter()
                result = self._retrieve(index, query, seen, choice, probabilities)
                timings["retrieval_s"] = timings.get("retrieval_s", 0.0) + time.perf_counter() - started
                if result is not None:
                    yield result
                    return
            elif branch == "gen" and can_generate:
                started = time.perf_counter()
                yield from self._generate(index, batch, query, options, cancel, choice, probabilities)
                timings["diffusion_s"] = timings.get("diffusion_s", 0.0) + time.perf_counter() - started
                return

    def _retrieve(self, index: int, query: torch.Tensor, seen: set[int], choice: str,
                  probabilities: tuple[float, float] | None) -> ImageResult | None:
        hits = self.retriever.search(query.cpu().numpy(), RETRIEVAL_CANDIDATES, frozenset(seen))[0]
        for hit in hits:
            image = self.image_store.load(hit.url)
            if image is not None:
                seen.add(hit.id)
                return ImageResult(index, "retrieved", image, choice, probabilities, hit.score, hit.url, hit.caption)
        return None

    def _generate(self, index: int, states: torch.Tensor, query: torch.Tensor, options: GenerationOptions,
                  cancel: CancelCheck | None, choice: str,
                  probabilities: tuple[float, float] | None) -> Iterator[Event]:
        prompt_embeds = self.model.prompt_embeddings(states)
        # Diffusion runs in a worker thread so previews stream out while it denoises. If the consumer stops
        # reading (closes this generator), `abandoned` stops the denoising loop at its next step.
        updates: queue.Queue = queue.Queue()
        abandoned = threading.Event()

        def stop() -> bool:
            return abandoned.is_set() or (cancel is not None and cancel())

        def preview(step: int, total: int, image: Image.Image) -> None:
            updates.put(DiffusionPreview(index, step, total, image))

        def work() -> None:
            try:
                updates.put(("done", self.generator.generate(
                    prompt_embeds, guidance_scale=options.guidance_scale,
                    num_inference_steps=options.num_inference_steps, seed=options.seed, cancel=stop,
                    on_preview=preview, preview_every=options.preview_every)))
            except BaseException as error:  # re-raised in the caller's thread
                updates.put(("error", error))

        worker = threading.Thread(target=work, name=f"gill-diffusion-{index}", daemon=True)
        worker.start()
        try:
            while True:
                update = updates.get()
                if isinstance(update, DiffusionPreview):
                    yield update
                    continue
                break
        finally:
            abandoned.set()
        kind, value = update
        if kind == "error":
            raise value
        if value is not None:  # None: cancelled
            # As the reference: score the generated image by cosine to the text-side retrieval vector.
            _, image_vector = self.model.encode_images([value])
            score = float((image_vector.float() @ query.T.float()).squeeze())
            yield ImageResult(index, "generated", value, choice, probabilities, score)

