"""One dialogue turn: interleaved images and text in, a stream of typed events out.

Stages: ``build_prompt`` (token ids and CLIP prefixes) -> ``Components.decode`` (text deltas; on ``[IMG0]``
the 8 ``[IMG]`` states) -> ``_resolve_image`` (decision head; then only the chosen branch: retrieval from
the corpus, or Stable Diffusion on the mapper's prompt embeddings). The same code runs in-process
(:class:`~gill.components.LocalComponents`) and inside the Triton orchestrator (remote components).
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

from gill.components import IMAGE_SLOT, Components, LocalComponents, Prompt
from gill.corpus import RetrievalSettings
from gill.decoding import CancelCheck, ImageStates, TokenStep
from gill.errors import InputError
from gill.events import DiffusionPreview, Done, Event, ImageRequest, ImageResult, Notice, TextDelta
from gill.images import load_image
from gill.options import GenerationOptions
from gill.retrieval import RetrievalFailed, RetrievalUnavailable

Part = str | Image.Image | bytes | Path


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
    """The turn logic over a set of :class:`~gill.components.Components`."""

    def __init__(self, components: Components) -> None:
        self.components = components

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, load_diffusion: bool = True,
                        load_retrieval: bool = True, safety_checker: bool = False,
                        retrieval: RetrievalSettings | None = None, verify: bool = True) -> Pipeline:
        """Everything in this process (see :meth:`LocalComponents.from_checkpoint`).

        ``verify``: first check the files against ``SHA256SUMS`` (:func:`gill.integrity.verify_checkpoint`; the
        loaders check shapes themselves); after the first check, only files changed since are hashed again.
        """
        if verify:
            from gill.integrity import verify_checkpoint

            verify_checkpoint(directory, shapes=False)
        return cls(LocalComponents.from_checkpoint(directory, device, dtype, load_diffusion, load_retrieval,
                                                   safety_checker, retrieval))

    def build_prompt(self, parts: Sequence[Part], options: GenerationOptions) -> Prompt:
        """Interleaved parts -> a :class:`Prompt`. BOS before the first text only (unless ``always_add_bos``)."""
        if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
            raise InputError("parts must be a list of text strings and images")
        if not parts:
            raise InputError("empty prompt: give at least one text or image part")
        images = {}
        for index, part in enumerate(parts):
            if isinstance(part, (Image.Image, bytes, bytearray, Path)):
                images[index] = load_image(part, what=f"part {index} (image)")
            elif not isinstance(part, str):
                raise InputError(f"part {index}: expected text (str) or an image, got {type(part).__name__}")
        if not images and not any(parts):
            raise InputError("empty prompt: every part is an empty string")
        prefixes = self.components.encode_images(list(images.values()))[0] if images else None
        tokenizer = self.components.tokenizer
        pieces, add_bos = [], True
        for index, part in enumerate(parts):
            if index in images:
                pieces.append(torch.full((prefixes.shape[1],), IMAGE_SLOT, dtype=torch.long))
            elif part:
                pieces.append(tokenizer(part, add_special_tokens=add_bos, return_tensors="pt").input_ids[0])
                add_bos = options.always_add_bos
        flat = prefixes.reshape(-1, prefixes.shape[-1]) if prefixes is not None else None
        return Prompt(torch.cat(pieces), flat)

    def stream(self, parts: Sequence[Part], options: GenerationOptions | None = None,
               cancel: CancelCheck | None = None, shown: frozenset[int] = frozenset()) -> Iterator[Event]:
        """Run one turn; yields :class:`TextDelta`, :class:`ImageRequest`, :class:`DiffusionPreview`,
        :class:`ImageResult` (and :class:`Notice`), then one :class:`Done`. Raises :class:`InputError` before the
        first event. Corpus ids in ``shown`` (images already shown in the conversation) are not retrieved."""
        options = options or GenerationOptions()
        start = time.perf_counter()
        timings: dict[str, float] = {}
        prompt = self.build_prompt(parts, options)
        timings["prompt_s"] = time.perf_counter() - start
        text = _TextStream(self.components.tokenizer)
        img_ids = set(self.components.tokens.img)
        generated, images, reason = 0, 0, "length"
        seen: set[int] = set(shown)
        decode_start = time.perf_counter()
        image_time = 0.0
        for step in self.components.decode(prompt, options, cancel):
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
        yield Done(text.emitted, prompt.length, generated, reason, timings)

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
        query, decision = self.components.image_heads(batch)
        choice = decision.choices[0]
        probabilities = None
        if decision.probabilities is not None:
            probabilities = (float(decision.probabilities[0, 0]), float(decision.probabilities[0, 1]))
        can_retrieve = options.allow_retrieval and self.components.can_retrieve
        can_generate = options.allow_generation and self.components.can_generate
        for branch in (["ret", "gen"] if choice == "ret" else ["gen", "ret"]):
            if branch == "ret" and can_retrieve:
                started = time.perf_counter()
                try:
                    found = self.components.retrieve(query, frozenset(seen))
                except (RetrievalFailed, RetrievalUnavailable) as error:
                    # Dead URLs or a corpus backend that is down must not fail the turn: say so, then generate.
                    code = "retrieval_failed" if isinstance(error, RetrievalFailed) else "retrieval_unavailable"
                    fallback = "; generating instead" if can_generate else ""
                    yield Notice(index, code, f"{error}{fallback}")
                    found = None
                timings["retrieval_s"] = timings.get("retrieval_s", 0.0) + time.perf_counter() - started
                if found is not None:
                    hit, image = found
                    seen.add(hit.id)
                    yield ImageResult(index, "retrieved", image, choice, probabilities, hit.score, hit.url,
                                      hit.caption, hit.id)
                    return
            elif branch == "gen" and can_generate:
                started = time.perf_counter()
                yield from self._generate(index, batch, query, options, cancel, choice, probabilities)
                timings["diffusion_s"] = timings.get("diffusion_s", 0.0) + time.perf_counter() - started
                return

    def _generate(self, index: int, states: torch.Tensor, query: torch.Tensor, options: GenerationOptions,
                  cancel: CancelCheck | None, choice: str,
                  probabilities: tuple[float, float] | None) -> Iterator[Event]:
        prompt_embeds = self.components.prompt_embeddings(states)
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
                updates.put(("done", self.components.generate(prompt_embeds, options, stop, preview)))
            except BaseException as error:  # re-raised in the caller's thread
                updates.put(("error", error))

        threading.Thread(target=work, name=f"gill-diffusion-{index}", daemon=True).start()
        try:
            while True:
                update = updates.get()
                if not isinstance(update, DiffusionPreview):
                    break
                yield update
        finally:
            abandoned.set()
        kind, value = update
        if kind == "error":
            raise value
        if value is not None:  # None: cancelled
            # As the reference: score the generated image by cosine to the text-side retrieval vector.
            _, image_vector = self.components.encode_images([value])
            score = float((image_vector.float() @ query.T.float().to(image_vector.device)).squeeze())
            yield ImageResult(index, "generated", value, choice, probabilities, score)
