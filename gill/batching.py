"""Dialogues decoding together: one KV cache, one forward per step, rows joining and leaving between steps.

A :class:`DecodeBatch` holds the rows being decoded: a left-padded attention mask ``[B, L]``, one
``DynamicCache`` with batch ``B`` and each row's next-token logits. Every row keeps its own options, sampling
rules, seeded generator, token budget and cancel check, so a row decodes the same tokens whether it runs
alone or beside others (up to float rounding of the batched matmuls). A step is two phases:

- :meth:`DecodeBatch.sample` draws one token per row and reports it; rows that finish leave the batch;
- :meth:`DecodeBatch.advance` runs one forward: the 8-token ``[IMG]`` chunk for rows that sampled
  ``[IMG0]`` (7 masked pads for the others), else one token per row.

:meth:`DecodeBatch.add` prefills new prompts apart and merges their caches in (left-padding the shorter
side), so a request joins a running batch at the next step instead of waiting for the batch to finish.
OPT takes positions from the cumulative attention mask, so padding columns change no row's positions.
:class:`ContinuousDecoder` runs that loop on its own thread for a server: requests come and go at any time.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from gill.errors import InputError
from gill.options import GenerationOptions
from gill.sampling import image_rule, warpers

if TYPE_CHECKING:
    from gill.decoding import Decoder

CancelCheck = Callable[[], bool]


@dataclass
class RowToken:
    """The row sampled ``token`` (None when it was cancelled before sampling); ``finished`` says why it stops."""

    token: int | None
    finished: str | None


@dataclass
class RowImage:
    """The row's ``[IMG0..7]`` chunk went through the LM: its ``[8, lm_width]`` last-layer states."""

    states: torch.Tensor


@dataclass
class RowEnd:
    """The row left the batch; ``error`` is set when decoding failed."""

    error: BaseException | None = None


RowEvent = RowToken | RowImage | RowEnd
_NO_IDS = torch.zeros(1, 0, dtype=torch.long)  # the warpers used here do not read the ids so far
Emit = Callable[[RowEvent], None]


class Row:
    """One dialogue turn being decoded: its options, sampling state and where its events go."""

    def __init__(self, decoder: Decoder, options: GenerationOptions, emit: Emit,
                 cancel: CancelCheck | None = None) -> None:
        self.options = options
        self.emit = emit
        self.cancel = cancel
        self.img = decoder.tokens.img
        self.eos, self.newline = decoder.tokens.eos, decoder.tokens.newline
        self.warpers = warpers(options)  # temperature and top-p; the [IMG] rule applies to all rows at once
        device = decoder.lm.get_input_embeddings().weight.device
        self.generator = None
        if options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)
        self.step = 0
        self.images_used = 0
        self.token: int | None = None  # the last sampled token, fed at the next forward
        self.image_pending = False  # sampled [IMG0]: the next forward feeds the [IMG] chunk
        self.finished: str | None = None
        self.failed = False  # an emit raised (the client is gone): leave at the next step

    def cancelled(self) -> bool:
        return self.failed or (self.cancel is not None and self.cancel())

    def send(self, event: RowEvent) -> None:
        try:
            self.emit(event)
        except Exception:  # noqa: BLE001 - a consumer that fails only ends its own row
            self.failed = True

    @property
    def image_blocked(self) -> bool:
        """``[IMG0]`` may not be sampled now: within the first ``min_word_tokens`` steps or out of image budget."""
        return self.step < self.options.min_word_tokens or self.images_used >= self.options.max_images

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """A sampled token, ``[1]`` on the device, from ``[1, V]`` scores that had the ``[IMG]`` rule applied."""
        scores = self.warpers(_NO_IDS, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)[0]

    def accept(self, token: int) -> None:
        """Take the drawn token and decide whether the row stops."""
        self.token = token
        self.image_pending = token == self.img[0]
        if self.image_pending:
            self.images_used += 1
        elif self.options.stop_at_eos and token == self.eos:
            self.finished = "eos"
        elif self.options.stop_at_newline and token == self.newline:
            self.finished = "newline"
        if self.step == self.options.max_new_tokens - 1 and self.finished is None:
            self.finished = "length"
        self.step += 1


class DecodeBatch:
    """The rows decoding together (see the module's docstring)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        embedding = decoder.lm.get_input_embeddings()
        self.device, self.dtype = embedding.weight.device, embedding.weight.dtype
        self.img_ids = torch.tensor(decoder.tokens.img)  # on the host: each step's ids are built there
        self.rows: list[Row] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.cache: DynamicCache | None = None
        self.logits: torch.Tensor | None = None  # [B, V]: each row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompts: list[torch.Tensor], rows: list[Row]) -> None:
        """Prefill ``prompts`` (each ``[T_i, D]``, checked by the caller) for ``rows`` and merge them in."""
        width = max(p.shape[0] for p in prompts)
        embeds = torch.zeros(len(prompts), width, prompts[0].shape[1], device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token sits at the end
            embeds[row, width - prompt.shape[0]:] = prompt.to(device=self.device, dtype=self.dtype)
            mask[row, width - prompt.shape[0]:] = 1
        cache = DynamicCache(config=self.decoder.lm.config)
        with torch.inference_mode():
            logits = self.decoder._logits(self.decoder._forward(embeds, mask, cache)[:, -1])
        if self.cache is None or not self.rows:
            self.rows, self.mask, self.cache, self.logits = list(rows), mask, cache, logits
            return
        length = max(self.mask.shape[1], width)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length, 2), _pad_left(new.keys, length, 2)])
            old.values = torch.cat([_pad_left(old.values, length, 2), _pad_left(new.values, length, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
        self.logits = torch.cat([self.logits, logits])
        self.rows.extend(rows)

    def sample(self) -> None:
        """One token per row, reported to the row; rows done (no ``[IMG]`` chunk to feed) leave the batch.

        The ``[IMG]`` rule applies to every row at once (each with its own step, budget and scale factors), greedy
        rows take one argmax together, sampling rows draw with their own temperature, top-p and generator; the
        tokens come to the host in one transfer (one wait for the device per step, not one per row)."""
        assert self.logits is not None
        for row in self.rows:
            if row.failed:  # its consumer is gone: nothing to draw for or report to
                row.finished, row.image_pending = row.finished or "cancelled", False
        live = [index for index, row in enumerate(self.rows) if not row.failed]
        rows = [self.rows[index] for index in live]
        tokens: list[int] = []
        if rows:
            with torch.inference_mode():
                logits = self.logits if len(live) == len(self.rows) else self.logits[live]
                settings = torch.tensor([[row.image_blocked, row.options.ret_scale_factor,
                                          row.options.gen_scale_factor] for row in rows], dtype=logits.dtype)
                settings = settings.to(self.device, non_blocking=True)
                scores = image_rule(logits, self.decoder.tokens.img, settings[:, 0] > 0, settings[:, 1],
                                    settings[:, 2])
                drawn = scores.argmax(dim=-1)
                sampling = [index for index, row in enumerate(rows) if row.options.temperature > 0]
                if sampling:
                    drawn = drawn.clone()
                    for index in sampling:
                        drawn[index:index + 1] = rows[index].draw(scores[index:index + 1])
                tokens = drawn.tolist()
        for row, token in zip(rows, tokens, strict=True):
            row.accept(token)
            # Checked before every forward: a cancelled row stops within one step.
            if (row.finished is None or row.image_pending) and row.cancelled():
                row.finished, row.image_pending = row.finished or "cancelled", False
            row.send(RowToken(row.token, row.finished))
        self._keep([row.image_pending or row.finished is None for row in self.rows])

    def advance(self) -> None:
        """One forward: the ``[IMG]`` chunk for rows that sampled ``[IMG0]``, the sampled token for the others."""
        if not self.rows:
            return
        image_rows = [row.image_pending for row in self.rows]
        chunk = len(self.img_ids) if any(image_rows) else 1
        # Built on the host and copied once: element writes into a device tensor are a copy each.
        ids = torch.full((len(self.rows), chunk), self.decoder.tokens.pad, dtype=torch.long)
        chunk_mask = torch.zeros(len(self.rows), chunk, dtype=torch.long)
        for index, row in enumerate(self.rows):
            if row.image_pending:
                ids[index], chunk_mask[index] = self.img_ids, 1
            else:
                ids[index, 0], chunk_mask[index, 0] = row.token, 1
        last = torch.tensor([chunk - 1 if image else 0 for image in image_rows])
        ids, chunk_mask, last = (t.to(self.device, non_blocking=True) for t in (ids, chunk_mask, last))
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        with torch.inference_mode():
            embeds = self.decoder.lm.get_input_embeddings()(ids)
            states = self.decoder._forward(embeds, self.mask, self.cache)
            self.logits = self.decoder._logits(states[torch.arange(len(self.rows), device=self.device), last])
        for index, row in enumerate(self.rows):
            if row.image_pending:
                row.image_pending = False
                row.send(RowImage(states[index].clone()))
        self._keep([row.finished is None for row in self.rows])

    def fail(self, error: BaseException) -> None:
        """End every row with ``error`` and start empty (a failed forward leaves the cache unusable)."""
        rows, self.rows = self.rows, []
        for row in rows:
            row.send(RowEnd(error))
        self.mask = self.mask[:0, :0]
        self.cache = self.logits = None

    def _keep(self, keep: list[bool]) -> None:
        if all(keep):
            return
        for row, kept in zip(self.rows, keep, strict=True):
            if not kept:
                row.send(RowEnd())
        index = torch.tensor([i for i, kept in enumerate(keep) if kept], dtype=torch.long, device=self.device)
        self.rows = [row for row, kept in zip(self.rows, keep, strict=True) if kept]
        if not self.rows:
            self.mask, self.cache, self.logits = self.mask[:0, :0], None, None
            return
        self.mask, self.logits = self.mask[index], self.logits[index]
        # Columns every remaining row has masked (the left padding of rows that left) are dropped.
        start = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ContinuousDecoder:
    """A decoding loop on its own thread: :meth:`submit` adds a turn at any time; it joins the running batch
    at the next step (at most ``max_batch`` rows decode together; more wait their turn in arrival order).

    Events reach each turn's ``emit`` on the loop's thread, in order, ending with one :class:`RowEnd`.
    """

    def __init__(self, decoder: Decoder, max_batch: int = 8, on_step: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.decoder = decoder
        self.max_batch = max_batch
        self.on_step = on_step  # called with the batch size before every forward (metrics, tests)
        self._waiting: deque[tuple[torch.Tensor, Row]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, prompt: torch.Tensor, options: GenerationOptions, emit: Emit,
               cancel: CancelCheck | None = None) -> None:
        """Queue one turn; a prompt that cannot fit the LM's window raises :class:`InputError` here."""
        self.decoder.check_prompt(prompt, options)
        row = Row(self.decoder, options, emit, cancel)
        with self._wake:
            self._waiting.append((prompt, row))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gill-decode-loop", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        batch = DecodeBatch(self.decoder)
        while True:
            with self._wake:
                while not self._waiting and not batch.rows:
                    self._wake.wait()
                joining = [self._waiting.popleft() for _ in range(min(len(self._waiting),
                                                                      self.max_batch - len(batch)))]
            try:
                self._admit(batch, joining)
                if batch.rows:
                    batch.sample()
                    if batch.rows:
                        if self.on_step is not None:
                            self.on_step(len(batch))
                        batch.advance()
            except Exception as error:  # noqa: BLE001 - the loop must outlive one failed step
                traceback.print_exc()
                batch.fail(error)

    @staticmethod
    def _admit(batch: DecodeBatch, joining: list[tuple[torch.Tensor, Row]]) -> None:
        ready = []
        for prompt, row in joining:
            if row.cancelled():  # cancelled while waiting: no prefill
                row.send(RowToken(None, "cancelled"))
                row.send(RowEnd())
            else:
                ready.append((prompt, row))
        if not ready:
            return
        try:
            batch.add([prompt for prompt, _ in ready], [row for _, row in ready])
        except Exception as error:  # noqa: BLE001 - a failed prefill ends only the joining rows
            for _, row in ready:
                row.send(RowEnd(error))
            if not isinstance(error, InputError):
                traceback.print_exc()
