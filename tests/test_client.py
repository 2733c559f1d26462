"""The typed client (gill_client) against a real tritonserver on loopback: streaming, conversations,
cancellation, deadlines, retries, API keys, TLS, health, and the `gill chat` command."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
import sys
import threading
import time

import pytest
from proxy import Proxy
from wire import API_KEY, PROMPT_GEN, PROMPT_RET, metric, self_signed

from gill.images import png_bytes
from gill.serving.server import free_port
from gill.tiny import shape_image
from gill_client import (
    AsyncGillClient,
    Cancelled,
    ChatOptions,
    DeadlineExceeded,
    Done,
    GillClient,
    ImageEvent,
    InvalidArgument,
    Preview,
    RetryPolicy,
    TextDelta,
    Unauthenticated,
    Unavailable,
    user,
)
from gill_client._transport import TLS

IMAGE_TURN = ChatOptions(gen_scale_factor=1e5, min_word_tokens=4, num_inference_steps=3, seed=3)
# A turn that spends its time denoising: an image at once, 200 steps, a preview after each.
LONG_TURN = ChatOptions(ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=200, preview_every=1, seed=1)
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.1, max_backoff_s=0.5)


@pytest.fixture
def client(server):
    with GillClient(server.endpoints.grpc, api_key=API_KEY, timeout=120) as running:
        yield running


def wait_for_metric(server, name: str, above: float, timeout: float = 30, **labels) -> float:
    deadline = time.monotonic() + timeout
    while (value := metric(server, name, **labels)) <= above:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
        time.sleep(0.2)
    return value


def test_sync_chat_streams_typed_text_then_an_image_then_done(client, tmp_path):
    photo = tmp_path / "input.png"
    photo.write_bytes(png_bytes(shape_image("green", "square", "white", 48)))
    events = list(client.chat(user(photo, "what is this? show me another"), IMAGE_TURN))
    assert isinstance(events[0], TextDelta) and isinstance(events[-1], Done)
    images = [e for e in events if isinstance(e, ImageEvent)]
    assert len(images) == 1 and images[0].source in ("generated", "retrieved")
    assert images[0].pil().size[0] > 0 and images[0].png.startswith(b"\x89PNG")
    assert images[0].decision in ("generate", "retrieve") and images[0].p_generate is not None
    done = events[-1]
    assert done.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert done.generated_tokens > 0 and done.timings["total_s"] > 0


def test_async_chat_streams_the_same_turn(server, client):
    expected = list(client.chat("hello there", ChatOptions(max_new_tokens=8, max_images=0)))

    async def turn():
        async with AsyncGillClient(server.endpoints.grpc, api_key=API_KEY) as aclient:
            assert await aclient.ready()
            return [event async for event in aclient.chat("hello there", ChatOptions(max_new_tokens=8,
                                                                                       max_images=0))]

    got = asyncio.run(turn())
    assert got[-1] == expected[-1].__class__(**{**expected[-1].__dict__, "timings": got[-1].timings})
    assert [e for e in got if isinstance(e, TextDelta)] and isinstance(got[-1], Done)


def test_a_three_turn_conversation_keeps_text_and_received_images(client):
    conversation = client.conversation(ChatOptions(max_new_tokens=6, num_inference_steps=2, seed=0))
    first = conversation.ask(png_bytes(shape_image("red", "circle", "white", 48)), "what is this?",
                             options=ChatOptions(max_images=0))
    second = conversation.ask("show me one", options=ChatOptions(gen_scale_factor=1e5, min_word_tokens=2))
    assert len(second.images) == 1
    third_stream = conversation.send("and another one?", options=ChatOptions(max_images=0))
    third = third_stream.collect()
    assert [m.role for m in conversation.messages] == ["user", "assistant"] * 3
    # The image the server sent in turn two is part of the history sent with turn three.
    assert second.images[0] in conversation.messages[3].parts
    assert third.done.prompt_tokens > second.done.prompt_tokens > first.done.prompt_tokens


def test_an_image_retrieved_earlier_in_the_conversation_is_not_retrieved_again(client):
    only_retrieval = ChatOptions(ret_scale_factor=1e5, max_new_tokens=1, allow_generation=False)
    conversation = client.conversation(only_retrieval)
    first = conversation.ask(PROMPT_RET).images[0]
    second = conversation.ask(PROMPT_RET).images[0]
    third = conversation.ask(PROMPT_RET).images[0]
    assert first.source == second.source == third.source == "retrieved"
    assert len({first.corpus_id, second.corpus_id, third.corpus_id}) == 3 and first.corpus_id is not None
    # Without the history the best hit comes back.
    assert client.chat(PROMPT_RET, only_retrieval).collect().images[0].corpus_id == first.corpus_id


def test_async_conversation_and_a_failed_turn_leaves_history_unchanged(server):
    async def talk():
        async with AsyncGillClient(server.endpoints.grpc, api_key=API_KEY) as aclient:
            conversation = aclient.conversation(ChatOptions(max_new_tokens=4, max_images=0))
            await conversation.ask("hi")
            with pytest.raises(InvalidArgument, match="temperature"):
                await conversation.ask("again", options=ChatOptions(temperature=-1.0))
            await conversation.ask("bye")
            return conversation.messages

    messages = asyncio.run(talk())
    assert [m.role for m in messages] == ["user", "assistant"] * 2
    assert messages[2].parts == ("bye",)


def test_leaving_the_loop_cancels_the_request_on_the_server(server, client):
    before = metric(server, "gill_diffusion_requests_total", outcome="cancelled")
    previews = 0
    for event in client.chat(PROMPT_GEN, LONG_TURN):
        if isinstance(event, Preview):
            previews += 1
            if previews == 2:
                break
    wait_for_metric(server, "gill_diffusion_requests_total", before, outcome="cancelled")


def test_cancel_from_another_thread_raises_cancelled(server, client):
    before = metric(server, "gill_turns_total", outcome="cancelled")
    stream = client.chat(PROMPT_GEN, LONG_TURN)
    with pytest.raises(Cancelled):
        for event in stream:
            if isinstance(event, Preview):
                threading.Timer(0.1, stream.cancel).start()
    wait_for_metric(server, "gill_turns_total", before, outcome="cancelled")


def test_cancelling_the_asyncio_task_cancels_the_request_on_the_server(server):
    before = metric(server, "gill_diffusion_requests_total", outcome="cancelled")

    async def run():
        first_preview = asyncio.Event()

        async def consume(aclient):
            async for event in aclient.chat(PROMPT_GEN, LONG_TURN):
                if isinstance(event, Preview):
                    first_preview.set()

        async with AsyncGillClient(server.endpoints.grpc, api_key=API_KEY) as aclient:
            task = asyncio.create_task(consume(aclient))
            await asyncio.wait_for(first_preview.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    wait_for_metric(server, "gill_diffusion_requests_total", before, outcome="cancelled")


def test_breaking_out_of_an_async_for_cancels_the_request_on_the_server(server):
    before = metric(server, "gill_diffusion_requests_total", outcome="cancelled")

    async def run():
        async with AsyncGillClient(server.endpoints.grpc, api_key=API_KEY) as aclient:
            async for event in aclient.chat(PROMPT_GEN, LONG_TURN):
                if isinstance(event, Preview):
                    break
            # The abandoned stream is closed by asyncio's async-generator finalizer, which cancels the call.
            wait_for = time.monotonic() + 30
            while metric(server, "gill_diffusion_requests_total", outcome="cancelled") <= before:
                assert time.monotonic() < wait_for, "the server never saw the cancellation"
                await asyncio.sleep(0.2)

    asyncio.run(run())


def test_a_deadline_raises_deadline_exceeded_and_the_server_keeps_serving(server, client):
    before = metric(server, "gill_turns_total", outcome="cancelled")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        list(client.chat(PROMPT_GEN, LONG_TURN, timeout=1.5))
    assert time.monotonic() - started < 10
    assert raised.value.code == "DEADLINE_EXCEEDED" and raised.value.request_id
    wait_for_metric(server, "gill_turns_total", before, outcome="cancelled")
    assert isinstance(list(client.chat("hello", ChatOptions(max_new_tokens=2, max_images=0)))[-1], Done)


def test_server_down_is_a_clear_unavailable_error():
    address = f"127.0.0.1:{free_port()}"
    with GillClient(address, retry=RetryPolicy(attempts=2, initial_backoff_s=0.05)) as down:
        assert not down.live() and not down.ready()
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"cannot reach the GILL server at {address}.*is it running"):
            list(down.chat("hello"))
    assert time.monotonic() - started < 10

    async def down_async() -> None:
        async with AsyncGillClient(address, retry=RetryPolicy(attempts=2, initial_backoff_s=0.05)) as client:
            with pytest.raises(Unavailable, match=f"cannot reach the GILL server at {address}.*is it running"):
                async for _ in client.chat("hello"):
                    pass

    asyncio.run(down_async())  # the asyncio stack's errors are typed alike


def test_unavailable_before_the_first_event_is_retried(server, caplog):
    proxy = Proxy(server.endpoints.grpc, refuse_first=2)
    try:
        with caplog.at_level(logging.WARNING, logger="gill_client"), \
                GillClient(proxy.address, api_key=API_KEY, retry=FAST_RETRY) as flaky:
            events = list(flaky.chat("hello", ChatOptions(max_new_tokens=3, max_images=0)))
    finally:
        proxy.close()
    assert isinstance(events[-1], Done)
    assert proxy.connections == 3
    assert [r.message for r in caplog.records if "retry" in r.message][:2]


def test_a_failure_after_the_first_event_is_not_retried(server):
    proxy = Proxy(server.endpoints.grpc)
    try:
        with GillClient(proxy.address, api_key=API_KEY, retry=FAST_RETRY) as flaky:
            with pytest.raises(Unavailable):
                for _ in flaky.chat(PROMPT_GEN, LONG_TURN):
                    proxy.cut()
    finally:
        proxy.close()
    assert proxy.connections == 1


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789"])
def test_a_missing_or_wrong_api_key_is_unauthenticated_and_not_retried(server, key):
    with GillClient(server.endpoints.grpc, api_key=key, retry=RetryPolicy(attempts=5, initial_backoff_s=1)) as bad:
        assert bad.live()  # health checks stay open for probes
        started = time.monotonic()
        with pytest.raises(Unauthenticated, match="API key"):
            list(bad.chat("hello"))
    assert time.monotonic() - started < 1


def test_invalid_options_raise_invalid_argument_with_the_servers_message(client):
    with pytest.raises(InvalidArgument) as raised:
        list(client.chat("hello", ChatOptions(top_p=0.5)))
    assert raised.value.code == "INVALID_ARGUMENT" and "top_p" in raised.value.message


def test_health_checks(client):
    assert client.live() and client.ready()
    client.wait_until_ready(timeout=5)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_with_a_private_certificate_authority(server, tmp_path):
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    proxy = Proxy(server.endpoints.grpc, tls=context)
    try:
        with GillClient(f"grpcs://{proxy.address}", api_key=API_KEY, tls=TLS.from_files(ca=cert)) as secure:
            assert isinstance(list(secure.chat("hi", ChatOptions(max_new_tokens=2, max_images=0)))[-1], Done)
        # Without trusting the certificate the handshake fails: an error, never a plaintext fallback.
        with GillClient(f"grpcs://{proxy.address}", api_key=API_KEY, retry=RetryPolicy(attempts=1)) as untrusted:
            with pytest.raises(Unavailable):
                list(untrusted.chat("hi"))
    finally:
        proxy.close()


def _gill_chat(server, *args: str, stdin: str | None = None, key: str = API_KEY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gill.cli", "chat", "--url", server.endpoints.grpc, *args],
                          input=stdin, capture_output=True, text=True, timeout=300,
                          env={"GILL_API_KEY": key, "PATH": "/usr/bin:/bin"})


def test_gill_chat_one_shot_streams_text_and_saves_images(server, tmp_path):
    photo = tmp_path / "in.png"
    photo.write_bytes(png_bytes(shape_image("blue", "circle", "white", 48)))
    result = _gill_chat(server, PROMPT_GEN, "--image", str(photo), "--out", str(tmp_path / "out"),
                        "--gen-scale-factor", "1e5", "--min-word-tokens", "3", "--steps", "4", "--preview-every", "2",
                        "--no-retrieval",
                        "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert "[generating image 0: step 2/" in result.stderr
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and f"-> {saved[0]}" in result.stdout
    assert "[image 0: " in result.stdout and "tokens, stop:" in result.stderr


def test_gill_chat_conversation_reads_messages_and_commands(server, tmp_path):
    photo = tmp_path / "in.png"
    photo.write_bytes(png_bytes(shape_image("blue", "circle", "white", 48)))
    script = f"hello\n/image {photo}\nwhat is this?\n/reset\nbye\n"
    result = _gill_chat(server, "--max-new-tokens", "3", "--max-images", "0", "--out", str(tmp_path), stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tokens, stop:") == 3
    assert f"[{photo} attached" in result.stderr and "[conversation forgotten]" in result.stderr


def test_gill_chat_reports_errors_with_their_code(server):
    result = _gill_chat(server, "hello", "--temperature", "-1")
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "temperature" in result.stderr
    result = _gill_chat(server, "hello", key="")
    assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr
    result = _gill_chat(server, "hello", "--image", "/nonexistent.png")
    assert result.returncode == 2 and "no such image file" in result.stderr


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", b"\x09\x00\x00\x00abc"])
def test_a_malformed_event_is_a_typed_error_that_says_to_retry(raw):
    """What a client got when the server's dialogue model died while sending (seen in the soak): not a struct.error."""
    from tritonclient.grpc import service_pb2

    from gill_client import _transport as transport
    from gill_client.errors import Internal

    response = service_pb2.ModelStreamInferResponse()
    response.infer_response.raw_output_contents.append(raw)
    with pytest.raises(Internal, match="malformed event from the server .*retry it"):
        transport.chat_event(response, "r1")
