"""The web demo (gill/demo.py): how events become chat messages, the page's error when the server is down, and a
real browser (Debian's Chromium, driven by Playwright) chatting through the demo with the served tiny model."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
from wire import API_KEY, PROMPT_GEN, metric

from gill.serving.server import free_port
from gill.tiny import shape_image
from gill_client import Done, ImageEvent, Notice, TextDelta

demo = pytest.importorskip("gill.demo", reason="gradio is not installed (pip install -e '.[dev]')")

CHROMIUM = os.environ.get("GILL_CHROMIUM", "/usr/bin/chromium")
PNG = b"\x89PNG\r\n\x1a\n"


def retrieved(score: float = 0.3125) -> ImageEvent:
    return ImageEvent(index=0, source="retrieved", png=PNG, url="https://example.com/cat.jpg", caption="a cat",
                      score=score, corpus_id=7)


def test_captions_say_where_an_image_came_from():
    assert demo.caption(retrieved()) == "retrieved from CC3M (score 0.31): a cat [link](https://example.com/cat.jpg)"
    assert demo.caption(ImageEvent(0, "generated", PNG, score=0.2), steps=50) == "generated (50 steps)"


def test_events_become_chat_messages_and_a_finished_exchange_joins_the_history(tmp_path):
    exchange = demo.Exchange.start("show me a cat", [])
    for event in (TextDelta("here "), TextDelta("it is"), retrieved(), Notice(1, "retrieval_failed", "generated"),
                  TextDelta("."), Done("here it is.", 5, 3, "eos")):
        exchange.apply(event, tmp_path)
    session = demo.Session([exchange])
    chat = session.chat()
    assert [m["role"] for m in chat] == ["user"] + ["assistant"] * 5
    assert chat[1]["content"] == "here it is"
    image = chat[2]["content"]
    assert Path(image["path"]).read_bytes() == PNG and image["alt_text"].startswith("retrieved from CC3M")
    assert chat[3]["content"].startswith("*retrieved from CC3M (score 0.31)")
    assert chat[4]["content"] == "*note: generated*" and chat[5]["content"] == "."
    assert [m.role for m in session.history()] == ["user", "assistant"]
    assert session.history()[1].parts[1].corpus_id == 7  # not retrieved again in the next turn


def test_a_stopped_exchange_stays_on_the_page_but_leaves_the_history(tmp_path):
    exchange = demo.Exchange.start("draw", [])
    exchange.apply(TextDelta("sure"), tmp_path)
    exchange.stop()
    session = demo.Session([exchange])
    assert session.chat()[-1]["content"] == demo.STOPPED and session.history() == []
    assert demo.Demo.undo(session)[0] == []


def test_a_server_that_is_down_is_an_error_message_not_a_stack_trace(tmp_path):
    app = demo.Demo(demo.Connection(f"127.0.0.1:{free_port()}", timeout_s=10), folder=tmp_path)

    async def turn():
        return [out async for out in app.respond({"text": "hello", "files": []}, demo.Session(), 1.0, 8, 0.0, 3,
                                                True, True)]

    outputs = asyncio.run(turn())
    chat, _, _, status, session = outputs[-1]
    # UNAVAILABLE: the asyncio client may report it as UNKNOWN, the gRPC status then in the message.
    assert status.startswith("**error:**") and "UNAVAILABLE" in status, status
    assert chat[-1]["content"].startswith("*(failed:") and session.history() == []


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e "
                                                                 "'.[dev]')")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GILL_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


def wait_for_metric(server, name: str, above: float, timeout: float = 30, **labels) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name, **labels) <= above:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {above}"
        time.sleep(0.2)


# Records every distinct text of the chat as the page changes, to see the answer stream in.
WATCH_CHAT = """() => {
  window.chatTexts = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const text = chat.innerText;
    if (window.chatTexts[window.chatTexts.length - 1] !== text) window.chatTexts.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_browser_chats_with_images_streams_text_and_stops_a_generation(server, browser, tmp_path):
    # Knobs the page starts with: an image as soon as four words are written, three denoising steps, a preview
    # each step. The browser moves the others (denoising steps, allow retrieval) like a user would.
    knobs = demo.Knobs(image_frequency=1e5, max_words=24, temperature=0.0, steps=3, min_word_tokens=4,
                       preview_every=1, seed=3)
    port = free_port()
    app = demo.Demo(demo.Connection(server.endpoints.grpc, api_key=API_KEY, timeout_s=120), knobs,
                    folder=tmp_path / "images").launch("127.0.0.1", port, block=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert requests.get(url, timeout=10).status_code == 200
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#message textarea")
        page.evaluate(WATCH_CHAT)

        picture = tmp_path / "square.png"
        shape_image("green", "square", "white", 48).save(picture)
        page.locator("#message input[type=file]").set_input_files(str(picture))
        page.wait_for_selector("#message img")  # the attachment's thumbnail: uploaded
        page.locator("#message textarea").fill("what is this? show me another one")
        page.locator("#message textarea").press("Enter")
        page.wait_for_selector("#status :text('done:')")
        texts = page.evaluate("window.chatTexts")
        answers = {text.split("show me another one", 1)[1].strip() for text in texts if "show me another one" in text}
        assert len(answers - {""}) >= 2, f"the answer did not stream: {texts}"
        assert page.locator("#chat img").count() >= 2  # the user's square and the answer's image
        assert page.locator("#chat :text-matches('^(generated|retrieved from CC3M)')").count() >= 1

        # A long generation, then Stop: the page says so and the server cancels the request.
        cancelled = metric(server, "gill_turns_total", outcome="cancelled")
        page.locator("#steps input[type=number]").fill("200")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#retrieval input[type=checkbox]").uncheck()
        page.locator("#message textarea").fill(PROMPT_GEN)
        page.locator("#message textarea").press("Enter")
        page.wait_for_selector("#preview img")  # the live preview: denoising is under way
        page.locator("#stop").click()
        page.wait_for_selector("#status :text('stopped')")
        page.wait_for_selector("#chat :text('stopped: this exchange')")
        wait_for_metric(server, "gill_turns_total", cancelled, outcome="cancelled")

        shots = [tmp_path / "demo.png"]
        if os.environ.get("GILL_DEMO_SCREENSHOT"):
            shots.append(Path(os.environ["GILL_DEMO_SCREENSHOT"]))
        for shot in shots:
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        assert shots[0].stat().st_size > 10_000
    finally:
        app.close()
