"""Continuous batching: turns join a running batch, leave it, and decode exactly as they would alone."""

import threading

import pytest
import torch

from gill.batching import ContinuousDecoder, DecodeBatch, Row, RowEnd, RowImage, RowToken
from gill.decoding import Decoder
from gill.errors import InputError
from gill.options import GenerationOptions

TEXTS = ["Q: hi\nA:", "Q: show me a red circle on a blue background\nA:", "A picture of", "Once upon a time there"]
GREEDY = GenerationOptions(max_new_tokens=12, stop_at_newline=False, stop_at_eos=False, max_images=0)


def _prompt(pipeline, text):
    prompt = pipeline.build_prompt([text], GenerationOptions())
    return pipeline.components.model.embed_prompt(prompt.ids, prompt.prefixes)


def _decoder(pipeline):
    return Decoder(pipeline.components.model.lm, pipeline.components.model.tokens)


class Turn:
    """Collects one row's events; ``done`` is set by its RowEnd."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.images: list[torch.Tensor] = []
        self.reasons: list[str | None] = []
        self.end: RowEnd | None = None
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.checks_after_cancel = 0

    def emit(self, event) -> None:
        if isinstance(event, RowToken):
            if event.token is not None:
                self.tokens.append(event.token)
            self.reasons.append(event.finished)
        elif isinstance(event, RowImage):
            self.images.append(event.states)
        else:
            assert self.end is None, "one RowEnd per row"
            self.end = event
            self.done.set()

    def cancelled(self) -> bool:
        cancelled = self.cancel_after is not None and len(self.tokens) >= self.cancel_after
        self.checks_after_cancel += cancelled
        return cancelled


def _alone(pipeline, text, options):
    turn = Turn()
    batch = DecodeBatch(_decoder(pipeline))
    batch.add([_prompt(pipeline, text)], [Row(batch.decoder, options, turn.emit)])
    while batch.rows:
        batch.sample()
        batch.advance()
    return turn


def test_turns_joining_a_running_batch_decode_as_they_would_alone(pipeline):
    """Turns arrive one after another while the others decode: each gets the tokens (and image states) it gets
    alone, though it shared forwards, padding and an [IMG] chunk with rows of other lengths."""
    options = [GREEDY, GenerationOptions(max_new_tokens=10, stop_at_newline=False, stop_at_eos=False,
                                         gen_scale_factor=1e5, min_word_tokens=2, max_images=1),
               GenerationOptions(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=7, stop_at_newline=False,
                                 stop_at_eos=False), GREEDY]
    decoder = _decoder(pipeline)
    batch = DecodeBatch(decoder)
    turns = [Turn() for _ in TEXTS]
    widths = []
    for index, (text, turn) in enumerate(zip(TEXTS, turns, strict=True)):
        batch.add([_prompt(pipeline, text)], [Row(decoder, options[index], turn.emit)])
        for _ in range(3):  # three steps before the next turn arrives
            batch.sample()
            batch.advance()
            widths.append(len(batch))
    while batch.rows:
        batch.sample()
        batch.advance()
    assert max(widths) == 4, "the turns overlapped"
    for text, option, turn in zip(TEXTS, options, turns, strict=True):
        alone = _alone(pipeline, text, option)
        assert turn.tokens == alone.tokens
        assert turn.reasons[-1] == alone.reasons[-1] == "length"
        assert len(turn.images) == len(alone.images)
        for got, expected in zip(turn.images, alone.images, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert any(turn.images for turn in turns), "one turn showed an image inside the batch"


def test_the_cache_drops_the_padding_of_rows_that_left(pipeline):
    decoder = _decoder(pipeline)
    batch = DecodeBatch(decoder)
    long_turn, short_turn = Turn(), Turn()
    short = GenerationOptions(max_new_tokens=2, stop_at_newline=False, stop_at_eos=False, max_images=0)
    batch.add([_prompt(pipeline, TEXTS[1] * 3), _prompt(pipeline, TEXTS[0])],
              [Row(decoder, short, long_turn.emit), Row(decoder, GREEDY, short_turn.emit)])
    padded = batch.mask.shape[1]
    while len(batch) == 2:
        batch.sample()
        batch.advance()
    assert long_turn.done.is_set() and not short_turn.done.is_set()
    assert batch.mask.shape[1] < padded, "the long prompt's columns went with it"
    assert bool(batch.mask.all()), "no column is padding for every row"
    assert batch.cache.get_seq_length() == batch.mask.shape[1]
    while batch.rows:
        batch.sample()
        batch.advance()
    assert short_turn.tokens == _alone(pipeline, TEXTS[0], GREEDY).tokens


def test_a_cancelled_turn_leaves_within_one_step_and_the_others_go_on(pipeline):
    decoder = _decoder(pipeline)
    batch = DecodeBatch(decoder)
    cancelled, other = Turn(cancel_after=3), Turn()
    long = GenerationOptions(max_new_tokens=20, stop_at_newline=False, stop_at_eos=False, max_images=0)
    batch.add([_prompt(pipeline, TEXTS[1]), _prompt(pipeline, TEXTS[2])],
              [Row(decoder, long, cancelled.emit, cancelled.cancelled), Row(decoder, long, other.emit)])
    while batch.rows:
        batch.sample()
        batch.advance()
    # The cancel is seen after its fourth token is sampled: that token is reported as the last, "cancelled".
    assert cancelled.reasons == [None, None, None, "cancelled"] and len(cancelled.tokens) == 4
    assert cancelled.checks_after_cancel == 1, "no step ran for it after the cancel was seen"
    assert other.tokens == _alone(pipeline, TEXTS[2], long).tokens


def test_continuous_decoder_serves_turns_submitted_from_many_threads(pipeline):
    sizes = []
    engine = ContinuousDecoder(_decoder(pipeline), max_batch=3, on_step=sizes.append)
    turns = [Turn() for _ in range(6)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(6)]
    threads = [threading.Thread(target=engine.submit, args=(_prompt(pipeline, text), GREEDY, turn.emit))
               for text, turn in zip(texts, turns, strict=True)]
    for thread in threads:
        thread.start()
    for turn in turns:
        assert turn.done.wait(60)
        assert turn.end.error is None
    assert max(sizes) <= 3 and max(sizes) > 1, sizes
    for text, turn in zip(texts, turns, strict=True):
        assert turn.tokens == _alone(pipeline, text, GREEDY).tokens


def test_a_consumer_that_fails_ends_only_its_own_turn(pipeline):
    engine = ContinuousDecoder(_decoder(pipeline))
    good = Turn()
    seen = []

    def broken(event):
        seen.append(event)
        if isinstance(event, RowToken):
            raise ConnectionError("client gone")

    engine.submit(_prompt(pipeline, TEXTS[0]), GREEDY, broken)
    engine.submit(_prompt(pipeline, TEXTS[1]), GREEDY, good.emit)
    assert good.done.wait(60)
    assert good.tokens == _alone(pipeline, TEXTS[1], GREEDY).tokens
    assert sum(isinstance(event, RowToken) for event in seen) == 1, "it left at the next step"
    assert isinstance(seen[-1], RowEnd)


def test_submit_refuses_a_prompt_that_cannot_fit(pipeline):
    engine = ContinuousDecoder(_decoder(pipeline))
    with pytest.raises(InputError, match="context too long"):
        engine.submit(_prompt(pipeline, "word " * 400), GREEDY, Turn().emit)
    with pytest.raises(ValueError, match="max_batch"):
        ContinuousDecoder(_decoder(pipeline), max_batch=0)
