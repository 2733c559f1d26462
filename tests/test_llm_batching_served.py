"""The served llm model decodes the turns in flight together (gill.batching), through the real server: the
session server, with the llm's default max_batch (8: model_repository/llm/config.pbtxt)."""

from __future__ import annotations

import threading
import time

from wire import events, metric, request, user

PROMPTS = ["tell me a long story", "what is this?", "describe the sea", "write a poem about cats"]


def _text(stream) -> str:
    done = [event.done for event in stream if event.WhichOneof("event") == "done"]
    assert len(done) == 1, stream
    return done[0].text


def test_concurrent_turns_share_decode_steps_and_equal_their_turns_alone(server):
    chats = [request(user(prompt), max_new_tokens=120, max_images=0) for prompt in PROMPTS]
    alone = [_text(events(server, chat)) for chat in chats]
    steps, rows = metric(server, "gill_llm_decode_steps_total"), metric(server, "gill_llm_decode_rows_total")
    together: list[str | None] = [None] * len(chats)

    def run(index: int) -> None:
        together[index] = _text(events(server, chats[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone, "a turn decoded beside others gives the text it gives alone"
    time.sleep(1.1)  # the llm model sends its step counters at most once a second: the next turn flushes them
    events(server, request(user("hi"), max_new_tokens=2, max_images=0))
    steps = metric(server, "gill_llm_decode_steps_total") - steps
    rows = metric(server, "gill_llm_decode_rows_total") - rows
    assert rows / steps > 1.2, f"{rows} rows in {steps} forwards: the turns did not share decode steps"
