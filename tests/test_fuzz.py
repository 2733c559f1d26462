"""Generated requests against the served ``gill`` model (hypothesis): every one ends in exactly one terminal
event, ``done`` or an ``INVALID_ARGUMENT`` error (an ``INTERNAL`` error is a bug), and the server stays healthy.

The inputs: ChatRequests with any roles (unknown numbers too), text with any characters, images that are valid,
random, empty, truncated or bombs, option values in and out of range (NaN, infinities, float32 extremes, huge
integers), and byte-level mutations of valid requests. Valid requests are cheap by construction (at most 4 new
tokens and 2 denoising steps), but a mutation may turn a budget into any value the limits allow. Derandomized:
the same examples every run, so a failure reproduces.
"""

from __future__ import annotations

import io

import requests
from bad_inputs import bomb_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from wire import events, kinds, metric, raw_events, request, user

from gill_client.v1 import dialogue_pb2 as pb


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
TERMINAL = ("done", "error")
TINIEST = 1.401298464324817e-45  # the smallest positive float32 (1e-45 on the wire)
FLOAT32_MAX = 3.4028234663852886e38

roles = st.sampled_from([pb.ROLE_USER, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_UNSPECIFIED, 3, 99, -1, 2**31 - 1])
image_data = st.one_of(st.just(PNG), st.just(PNG[: len(PNG) // 2]), st.just(b""), st.binary(max_size=64),
                       st.just(bomb_png(100_000, 100_000)))
mime_types = st.sampled_from(["image/png", "", "image/jpeg", "text/plain", "application/octet-stream"])
parts = st.one_of(
    st.text(max_size=40).map(lambda text: pb.Part(text=text)),
    st.builds(lambda data, mime: pb.Part(image=pb.Image(data=data, mime_type=mime)), image_data, mime_types),
    st.just(pb.Part()),
)
messages = st.builds(lambda role, items: pb.Message(role=role, parts=items), roles, st.lists(parts, max_size=3))
floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, TINIEST, FLOAT32_MAX, -1.0]))
int32 = st.integers(-(2**31), 2**31 - 1)
# Budgets are in the cheap range or invalid; never a valid expensive value.
options = st.fixed_dictionaries(
    {
        "max_new_tokens": st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 1025, 2**31 - 1])),
        "num_inference_steps": st.one_of(st.integers(1, 2), st.sampled_from([0, -3, 201, 2**31 - 1])),
    },
    optional={
        "temperature": floats, "top_p": floats, "seed": st.integers(0, 2**64 - 1), "min_word_tokens": int32,
        "ret_scale_factor": floats, "gen_scale_factor": floats, "guidance_scale": floats,
        "max_images": st.one_of(st.integers(0, 1), st.sampled_from([-1, 9, 2**31 - 1])),
        "allow_retrieval": st.booleans(), "allow_generation": st.booleans(), "preview_every": st.integers(-2, 3),
    },
)


@st.composite
def chat_requests(draw) -> bytes:
    chat = pb.ChatRequest(messages=draw(st.lists(messages, max_size=3)), request_id=draw(st.text(max_size=8)))
    chat.options.CopyFrom(pb.Options(**draw(options)))
    return chat.SerializeToString()


scale_factors = st.one_of(st.floats(0, FLOAT32_MAX, width=32), st.just(FLOAT32_MAX))


@st.composite
def valid_requests(draw) -> bytes:
    """Requests that must work: a conversation of any text (control characters included) and valid images,
    with sampling options anywhere in their valid range."""
    text = st.text(min_size=1, max_size=30)
    chat = pb.ChatRequest()
    for _ in range(draw(st.integers(0, 2))):
        chat.messages.add(role=pb.ROLE_USER, parts=[pb.Part(text=draw(text))])
        chat.messages.add(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text=draw(text))])
    # Sometimes longer than the tiny model's 256-token window: then "context too long" is the right answer.
    last = [pb.Part(text=draw(st.one_of(text, st.integers(50, 400).map(lambda words: "word " * words))))]
    if draw(st.booleans()):
        last.insert(0, pb.Part(image=pb.Image(data=PNG, mime_type=draw(st.sampled_from(["image/png", ""])))))
    chat.messages.add(role=pb.ROLE_USER, parts=last)
    temperature = draw(st.one_of(st.just(0.0), st.floats(TINIEST, 1e4, width=32), st.just(TINIEST)))
    chat.options.CopyFrom(pb.Options(
        max_new_tokens=draw(st.integers(1, 4)), num_inference_steps=draw(st.integers(1, 2)),
        max_images=draw(st.integers(0, 1)), temperature=temperature,
        top_p=draw(st.floats(TINIEST, 1.0, width=32)) if temperature > 0 else 1.0,
        seed=draw(st.integers(0, 2**63 - 1)), ret_scale_factor=draw(scale_factors),
        gen_scale_factor=draw(scale_factors), guidance_scale=draw(st.floats(0, 50, width=32))))
    return chat.SerializeToString()


@st.composite
def mutated_requests(draw) -> bytes:
    """A valid cheap request with a few bytes flipped, inserted, deleted, or the end cut off."""
    base = request(user(draw(st.sampled_from([PNG, b"x"])), draw(st.text(min_size=1, max_size=12))),
                   max_new_tokens=2, max_images=0, num_inference_steps=1)
    data = bytearray(base.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        operation = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if operation == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete" and data:
            del data[position]
        elif operation == "cut":
            del data[position:]
    return bytes(data)


# (valid by construction, request bytes); valid requests drawn twice as often, as most others are refused early.
_valid = valid_requests().map(lambda data: (True, data))
cases = st.one_of(_valid, _valid, chat_requests().map(lambda data: (False, data)),
                  mutated_requests().map(lambda data: (False, data)))


def test_fuzzed_requests_end_in_done_or_a_typed_error_and_the_server_stays_healthy(server):
    internal_before = metric(server, "gill_turns_total", outcome="error")
    seen = {"done": 0, "error": 0}

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases)
    def one_turn(case: tuple[bool, bytes]) -> None:
        valid, data = case
        stream = raw_events(server, data)
        names = kinds(stream)
        assert [name for name in names if name in TERMINAL] == names[-1:] and names, names
        if valid:
            assert names[-1] == "done" or "context too long" in stream[-1].error.message, stream
        if names[-1] == "error":
            error = stream[-1].error
            assert error.code == pb.ERROR_CODE_INVALID_ARGUMENT, (pb.ErrorCode.Name(error.code), error.message)
            assert error.message
        seen[names[-1]] += 1

    one_turn()
    assert seen["done"] > 0 and seen["error"] > 0, seen  # the generator reaches both outcomes
    for probe in ("live", "ready"):
        assert requests.get(f"{server.endpoints.http}/v2/health/{probe}", timeout=5).status_code == 200
    assert kinds(events(server, request(user("hello"), max_new_tokens=2, max_images=0)))[-1] == "done"
    assert metric(server, "gill_turns_total", outcome="error") == internal_before  # no turn failed INTERNAL
