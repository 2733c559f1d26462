"""Faults on the session server: a Python-backend stub killed, the client vanishing mid-stream, a burst of
cancellations. Each test leaves the server ready and serving (the next test relies on it)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
from wire import API_KEY, PROMPT_GEN, PROMPT_RET, events, kinds, metric, open_turn, request, user

from gill.serving.server import TritonServer
from gill.serving.watchdog import live_stubs
from gill_client import Cancelled, ChatOptions, GillClient, RetryPolicy, Unavailable
from gill_client import _transport as transport
from gill_client.v1 import dialogue_pb2 as pb

CHEAP = {"max_new_tokens": 2, "max_images": 0}


def _stubs(server, model: str) -> list[psutil.Process]:
    return live_stubs(psutil.Process(server.process.pid), (server.work_dir / "models").resolve()).get(model, [])


def _ready(server, model: str | None = None) -> bool:
    path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
    return requests.get(server.endpoints.http + path, timeout=5).status_code == 200


def _wait(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def _serves(server) -> bool:
    """Whether a cheap text turn completes now (a stuck llm is reloaded by the watchdog meanwhile)."""
    try:
        return _ready(server) and kinds(events(server, request(user("hello"), **CHEAP)))[-1] == "done"
    except Exception:  # noqa: BLE001 - a model being reloaded: not yet
        time.sleep(1)
        return False


def _kill_stub(server, model: str) -> int:
    [stub] = _stubs(server, model)
    stub.kill()
    return stub.pid


def _wait_recovered(server, model: str, recoveries_before: int) -> None:
    _wait(lambda: len(server.watchdog.recoveries) > recoveries_before and server.watchdog.recoveries[-1].finished,
          180, f"the watchdog reloads {model}")
    recovery = server.watchdog.recoveries[-1]
    assert recovery.model == model and recovery.ok, recovery
    _wait(lambda: _ready(server), 30, "the server is ready again")


def test_quiet_turns_get_heartbeats(server):
    # 200 denoising steps and no previews: seconds without an event, but never without a response.
    chat = request(user(PROMPT_GEN), gen_scale_factor=1e5, max_new_tokens=1, num_inference_steps=200, seed=4)
    started, gaps, heartbeats = time.monotonic(), [], 0
    for response in open_turn(server, chat):
        gaps.append(time.monotonic() - started)
        started = time.monotonic()
        event, _ = transport.chat_event(response, "")
        heartbeats += event is None and not response.infer_response.parameters["triton_final_response"].bool_param
    assert heartbeats >= 1 and max(gaps) < 2.5, (heartbeats, gaps)


_VANISHING_CLIENT = """
import sys, time
from gill_client import ChatOptions, GillClient
client = GillClient(sys.argv[1], api_key=sys.argv[2])
options = ChatOptions(gen_scale_factor=1e5, max_new_tokens=1, num_inference_steps=200, preview_every=1, seed=2)
for event in client.chat("draw a red circle", options):
    if type(event).__name__ == "Preview":
        print("preview", flush=True)
        time.sleep(600)  # killed here, mid-stream
"""


def test_a_client_that_vanishes_mid_stream_stops_the_server_work(server):
    steps_before = metric(server, "gill_denoising_steps_total")
    cancelled_before = metric(server, "gill_diffusion_requests_total", outcome="cancelled")
    client = subprocess.Popen([sys.executable, "-c", _VANISHING_CLIENT, server.endpoints.grpc, API_KEY],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "preview"
    finally:
        client.kill()  # SIGKILL: no cancel message, the connection just drops
        client.wait()
    _wait(lambda: metric(server, "gill_diffusion_requests_total", outcome="cancelled") > cancelled_before, 30,
          "the server stops denoising for a client that is gone")
    assert metric(server, "gill_denoising_steps_total") - steps_before < 200
    assert kinds(events(server, request(user("hello"), **CHEAP)))[-1] == "done"


def test_a_burst_of_cancellations_leaves_no_turn_behind(server):
    turns_before = metric(server, "gill_turns_total")
    recoveries_before = len(server.watchdog.recoveries)
    burst = 16
    outcomes: list[str] = []

    def one(index: int) -> None:
        options = ChatOptions(max_new_tokens=48, temperature=0.9, top_p=0.9, seed=index, max_images=0)
        with GillClient(server.endpoints.grpc, api_key=API_KEY, timeout=120) as client:
            stream = client.chat(f"tell me a story number {index}", options)
            try:
                for _ in stream:
                    time.sleep(random.Random(index).uniform(0, 0.2))
                    stream.cancel()
                outcomes.append("finished")
            except Cancelled:
                outcomes.append("cancelled")

    threads = [threading.Thread(target=one, args=(index,)) for index in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    deaths = [r for r in server.watchdog.recoveries[recoveries_before:] if r.reason == "died"]
    if deaths:  # the turns in flight are lost (Unavailable), not cancelled; the server must come back all the same
        _wait(lambda: _serves(server), 240, "the server serves again after the stub's death")
        pytest.xfail(f"the {deaths[0].model} stub died in the burst: Triton 2.51's Python-backend race "
                     "(docs/reliability.md, issue 6), not the cancellations under test")
    assert len(outcomes) == burst and "cancelled" in outcomes, outcomes
    # The server saw every turn end (cancelled or not): none is left running or lost.
    _wait(lambda: metric(server, "gill_turns_total") - turns_before == burst, 60, "every turn of the burst ends")
    assert _ready(server) and len(server.watchdog.recoveries) == recoveries_before  # no stub died
    assert kinds(events(server, request(user("hello"), **CHEAP)))[-1] == "done"


def test_a_killed_stub_makes_the_server_not_ready_until_the_watchdog_reloaded_it(server):
    before = len(server.watchdog.recoveries)
    pid = _kill_stub(server, "mapper")
    # Triton alone keeps answering ready with a dead stub; the watchdog unloads the model within a poll.
    _wait(lambda: not _ready(server, "mapper") and not _ready(server), 10, "readiness reports the broken model")
    # A turn meanwhile gets a typed, retryable error that names the model.
    [error] = [e.error for e in events(server, request(user(PROMPT_GEN), gen_scale_factor=1e5, max_new_tokens=2,
                                                       num_inference_steps=2))]
    assert error.code == pb.ERROR_CODE_UNAVAILABLE and "mapper" in error.message and "retry" in error.message
    _wait_recovered(server, "mapper", before)
    assert pid not in [stub.pid for stub in _stubs(server, "mapper")]
    stream = events(server, request(user(PROMPT_GEN), gen_scale_factor=1e5, max_new_tokens=2, num_inference_steps=2))
    assert kinds(stream)[-1] == "done" and "image" in kinds(stream)
    assert metric(server, "gill_turns_total", outcome="unavailable") >= 1


def test_a_client_with_retries_rides_through_a_reload(server):
    before = len(server.watchdog.recoveries)
    _kill_stub(server, "llm")
    _wait(lambda: not _ready(server), 10, "readiness reports the broken model")
    patient = RetryPolicy(attempts=200, initial_backoff_s=0.2, max_backoff_s=0.5)
    with GillClient(server.endpoints.grpc, api_key=API_KEY, retry=patient, timeout=240) as client:
        reply = client.chat("hello", ChatOptions(**CHEAP)).collect()
    assert reply.done.generated_tokens == 2
    _wait_recovered(server, "llm", before)


def test_retrieval_down_generates_instead_with_a_notice(server):
    before = len(server.watchdog.recoveries)
    _kill_stub(server, "retrieval")
    stream = events(server, request(user(PROMPT_RET), ret_scale_factor=1e5, max_new_tokens=1, num_inference_steps=2))
    assert kinds(stream)[-1] == "done", stream
    [notice] = [e.notice for e in stream if e.WhichOneof("event") == "notice"]
    assert "retrieval" in notice.message
    [image] = [e.image for e in stream if e.WhichOneof("event") == "image"]
    assert image.source == pb.IMAGE_SOURCE_GENERATED
    _wait_recovered(server, "retrieval", before)


@pytest.fixture(scope="module")
def own_server(tiny_dir):
    """A server of its own for the faults that take the orchestrator down (the session server must keep serving),
    with the gill model on the BLS transport (what it uses under a plain tritonserver, without gill serve's gRPC
    endpoint parameters), whose failure modes these tests pin down."""
    with TritonServer(tiny_dir, parameters={"gill": {"heartbeat_s": "1", "transport": "bls"}}, stall_s=30) as server:
        yield server


LONG_IMAGE = ChatOptions(gen_scale_factor=1e5, max_new_tokens=1, num_inference_steps=200, preview_every=1, seed=1)


def test_the_orchestrator_killed_mid_turn_fails_the_turn_fast(own_server):
    """Triton 2.51 either leaves the dead stub's stream open (the client's idle timeout ends the turn, the watchdog
    reloads ``gill``) or aborts altogether (boost::interprocess::lock_exception in the Python backend when the stub
    died holding a shared-memory lock; measured). Either way the client gets a typed, retryable error within
    seconds instead of waiting for its deadline."""
    server = own_server
    before = len(server.watchdog.recoveries)
    seen = []
    with GillClient(server.endpoints.grpc, idle_timeout=4) as client:
        with pytest.raises(Unavailable) as raised:
            for event in client.chat(PROMPT_GEN, LONG_IMAGE):
                seen.append(type(event).__name__)
                if seen.count("Preview") == 1:
                    _kill_stub(server, "gill")
                    killed = time.monotonic()
    assert "Done" not in seen and time.monotonic() - killed < 15, (seen, raised.value)
    if server.process.poll() is not None:  # Triton aborted: `gill serve` exits non-zero with the log
        assert "lock_exception" in server.log_path.read_text() or server.process.returncode != 0
        return
    assert "no response from the server for 4 s" in str(raised.value)
    _wait(lambda: any(r.model == "gill" and r.finished for r in server.watchdog.recoveries[before:]), 180,
          "the watchdog reloads gill")
    assert kinds(events(server, request(user("hello"), **CHEAP)))[-1] == "done"
    # The diffusion loop was sending a preview to the dead stub: Triton 2.51 never returns from that send, and
    # the loop stops with it. The watchdog finds the model busy without a step for stall_s and reloads it; a
    # turn caught waiting on it loses its heartbeats once that stub is dead, so the client's idle timeout ends
    # it (Unavailable) instead of its deadline, and it is retried.
    asked, watchdog, restarts = time.time(), server.watchdog, server.restarts  # a restart starts a new watchdog
    reply, lost = _image_turn_retrying(server, within=150)
    assert reply.images, (reply, lost)
    stuck = [r for r in watchdog.recoveries[before:] if r.reason == "stuck"]
    assert [r.model for r in stuck] == ["diffusion"], watchdog.recoveries
    if server.restarts > restarts:
        # tritonserver itself segfaulted while the new diffusion instance initialised (Triton 2.51; 2 of 8 runs of
        # this test on 2026-12-07; docs/reliability.md) and was started again, as gill serve's supervisor does: the
        # turn above shows that everything came back. The crash is Triton's, in its own log.
        assert "Signal (11) received" in server.log_path.with_name("triton.log.1").read_text(errors="replace")
        return
    assert stuck[0].ok, watchdog.recoveries
    assert all("not ready" in error or "no response from the server for 10 s" in error for error in lost), lost
    if asked < stuck[0].started:  # the turn reached the stuck loop (the usual case: stall_s outlasts gill's reload)
        assert lost and "no response from the server for 10 s" in lost[0], lost


def test_a_frozen_orchestrator_is_reloaded(own_server):
    """A ``gill`` stub that stops without dying: Triton 2.51's BLS response iterator can deadlock it (every Python
    thread then waits, the heartbeats' too; docs/reliability.md), here SIGSTOP. Its progress file shows it busy
    with nothing sent for ``stall_s``: the watchdog kills it and reloads ``gill``, and turns work again."""
    server = own_server
    if server.process.poll() is not None:  # Triton aborted in the test before (as gill serve would, start it again)
        server.restart(timeout=240)
    _wait(lambda: _serves(server), 240, "the server serves")
    before = len(server.watchdog.recoveries)
    frozen = None
    with GillClient(server.endpoints.grpc, idle_timeout=4) as client:
        with pytest.raises(Unavailable) as raised:
            for event in client.chat(PROMPT_GEN, LONG_IMAGE):
                if type(event).__name__ == "Preview" and frozen is None:
                    [stub] = _stubs(server, "gill")
                    stub.suspend()
                    frozen = time.time()
        assert "no response from the server for 4 s" in str(raised.value)
        # Triton finds the frozen stub unhealthy: a new turn is refused at once, retryable.
        with pytest.raises(Unavailable, match="is not healthy"):
            client.chat(PROMPT_GEN, LONG_IMAGE, timeout=60).collect()
    _wait(lambda: any(r.model == "gill" and r.finished for r in server.watchdog.recoveries[before:]), 180,
          "the watchdog reloads the frozen gill")
    [reload] = [r for r in server.watchdog.recoveries[before:] if r.model == "gill"]
    assert reload.reason == "stuck" and reload.dead_pids == (stub.pid,) and reload.ok, server.watchdog.recoveries
    assert reload.started - frozen >= server.stall_s - 2  # busy, nothing sent: not before the stall timeout
    reply, lost = _image_turn_retrying(server, within=150)
    assert reply.images, (reply, lost)


def _image_turn_retrying(server, within: float):
    """A cheap generated-image turn, asked again after each Unavailable for up to ``within`` s; each attempt has a
    60-s deadline (a turn left waiting for ever, heartbeats and all, would miss it) and a 10-s idle timeout.
    A ``tritonserver`` that died meanwhile is started again, as `gill serve`'s supervisor does (its restart has a
    timeout of its own, outside ``within``). Returns the reply and the errors on the way."""
    options = ChatOptions(gen_scale_factor=1e5, min_word_tokens=1, max_new_tokens=4, num_inference_steps=2,
                          allow_retrieval=False, seed=2)
    lost, started = [], time.monotonic()
    with GillClient(server.endpoints.grpc, timeout=60, idle_timeout=10) as client:
        while True:
            try:
                return client.chat("show me a picture of a red circle", options).collect(), lost
            except Unavailable as error:
                lost.append(str(error))
                if server.process.poll() is not None:
                    restarting = time.monotonic()
                    server.restart(timeout=240)
                    started += time.monotonic() - restarting
                assert time.monotonic() - started < within, lost
                time.sleep(1)
