"""``gill demo``: a web chat with a served GILL model, in the browser, for many users at once.

    gill serve &                                  # the model, on localhost:8001
    gill demo --url localhost:8001 --port 7860    # then open http://127.0.0.1:7860

The demo holds no model: every turn goes through the asyncio client library (:mod:`gill_client`) to the Triton
server, so users are not serialized (the reference demo ran one at a time) and the stop button cancels the
request on the server. Each browser session keeps its own conversation. Images arrive inline with their source:
retrieved from CC3M (with score and link) or generated (with a live preview while denoising).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it must not phone home

import gradio as gr  # noqa: E402

from gill_client import (  # noqa: E402
    TLS,
    AsyncChatStream,
    AsyncGillClient,
    ChatOptions,
    Done,
    Event,
    GillClientError,
    ImageEvent,
    Message,
    Notice,
    Preview,
    RetryPolicy,
    TextDelta,
    user,
)
from gill_client.reply import ReplyBuilder  # noqa: E402

ChatMessage = dict[str, Any]  # {"role": "user" | "assistant", "content": str | {"path": ..., "alt_text": ...}}
STOPPED = "*(stopped: this exchange is not part of the conversation)*"


@dataclass(frozen=True)
class Knobs:
    """The reference demo's controls and their starting values (each browser session may move them)."""

    image_frequency: float = 1.3  # ret_scale_factor = gen_scale_factor: scales the [IMG0] logit; higher, more images
    max_words: int = 150  # max_new_tokens
    temperature: float = 0.6  # 0 is greedy
    steps: int = 50  # denoising steps of a generated image (the reference's PNDM schedule)
    allow_retrieval: bool = True
    allow_generation: bool = True
    # Not on the page: the command line sets them for every session.
    min_word_tokens: int | None = None  # no image during the first this many tokens (None: the server's default)
    preview_every: int = 5  # denoising steps between live previews
    seed: int | None = None

    def options(self) -> ChatOptions:
        """Returns the turn options these knobs ask for (greedy needs top_p 1, which is the server's default)."""
        return ChatOptions(max_new_tokens=self.max_words, temperature=self.temperature,
                           ret_scale_factor=self.image_frequency, gen_scale_factor=self.image_frequency,
                           num_inference_steps=self.steps, allow_retrieval=self.allow_retrieval,
                           allow_generation=self.allow_generation, min_word_tokens=self.min_word_tokens,
                           preview_every=self.preview_every, seed=self.seed)


@dataclass(frozen=True)
class Connection:
    """Where the GILL server is: its gRPC ``url`` (host:port or grpcs://host:port), API key, TLS settings."""

    url: str = "localhost:8001"
    api_key: str | None = None
    tls: bool | TLS = False
    timeout_s: float = 600.0


def caption(image: ImageEvent, steps: int | None = None) -> str:
    """Returns the line shown under an image: where it came from, its score and, when retrieved, its link."""
    score = f" (score {image.score:.2f})" if image.score is not None else ""
    if image.source == "retrieved":
        text = f": {image.caption}" if image.caption else ""
        link = f" [link]({image.url})" if image.url else ""
        return f"retrieved from CC3M{score}{text}{link}"
    if image.source == "generated":
        return f"generated ({steps} steps)" if steps else "generated"
    return f"image{score}"


@dataclass
class Exchange:
    """One user message and the assistant's answer: ``shown`` is what the page shows of it (chat messages),
    ``reply`` the assistant message for the model's history once the turn finished (None while streaming, or
    after it was stopped or failed: such an exchange is not sent again)."""

    user: Message
    shown: list[ChatMessage]
    reply: Message | None = None
    ended: bool = False
    builder: ReplyBuilder = field(default_factory=ReplyBuilder, repr=False)
    stream: AsyncChatStream | None = field(default=None, repr=False)

    @classmethod
    def start(cls, text: str, image_paths: list[str]) -> Exchange:
        """Returns the exchange of a user message of ``image_paths`` (first) and ``text``."""
        shown: list[ChatMessage] = [{"role": "user", "content": {"path": path}} for path in image_paths]
        if text:
            shown.append({"role": "user", "content": text})
        parts = [*(Path(path) for path in image_paths), *([text] if text else [])]
        return cls(user(*parts), shown)

    def apply(self, event: Event, folder: Path, steps: int | None = None) -> None:
        """Show one event: text extends the assistant's current message, an image is written under ``folder``
        and shown with its caption, a notice becomes a note, ``Done`` ends the exchange."""
        self.builder.add(event)
        if isinstance(event, TextDelta):
            last = self.shown[-1] if self.shown else None
            if last is not None and last["role"] == "assistant" and last.get("streaming"):
                last["content"] += event.text
            else:
                self.shown.append({"role": "assistant", "content": event.text, "streaming": True})
        elif isinstance(event, ImageEvent):
            self._seal()
            path = event.save(folder / f"{uuid.uuid4().hex}-{event.source}.png")
            line = caption(event, steps)
            self.shown.append({"role": "assistant", "content": {"path": str(path), "alt_text": line}})
            self.shown.append({"role": "assistant", "content": f"*{line}*"})
        elif isinstance(event, Notice):
            self._seal()
            self.shown.append({"role": "assistant", "content": f"*note: {event.message}*"})
        elif isinstance(event, Done):
            self._seal()
            self.reply = self.builder.reply().as_message()
            self.ended = True

    def stop(self, note: str = STOPPED) -> None:
        """End an unfinished exchange with ``note`` (it stays on the page but leaves the model's history) and
        cancel its request on the server."""
        if not self.ended:
            self._seal()
            self.shown.append({"role": "assistant", "content": note})
            self.ended = True
        if self.stream is not None:
            self.stream.cancel()  # a no-op once the turn is over

    def _seal(self) -> None:
        for message in self.shown:
            message.pop("streaming", None)


@dataclass
class Session:
    """One browser session's conversation (kept in ``gr.State``, so users never share one)."""

    exchanges: list[Exchange] = field(default_factory=list)

    def history(self) -> list[Message]:
        """The finished exchanges as messages for the next turn (stopped and failed ones left out)."""
        return [message for exchange in self.exchanges if exchange.reply is not None
                for message in (exchange.user, exchange.reply)]

    def chat(self) -> list[ChatMessage]:
        """Everything the page shows, as Chatbot messages."""
        return [{"role": m["role"], "content": m["content"]} for exchange in self.exchanges for m in exchange.shown]


def done_line(done: Done) -> str:
    """Returns the status line of a finished turn: tokens, stop reason, time."""
    total = done.timings.get("total_s")
    took = f", {total:.1f} s" if total is not None else ""
    return f"done: {done.generated_tokens} tokens, stop: {done.stop_reason}{took}"


class Demo:
    """The web app over one asyncio client (created in the server's event loop on first use, shared by every
    session: one gRPC channel multiplexes all turns)."""

    def __init__(self, connection: Connection, knobs: Knobs = Knobs(), folder: Path | None = None) -> None:
        self.connection = connection
        self.knobs = knobs
        self.folder = folder or Path(tempfile.mkdtemp(prefix="gill-demo-"))
        self._clients: dict[int, AsyncGillClient] = {}

    def client(self) -> AsyncGillClient:
        loop = asyncio.get_running_loop()
        if id(loop) not in self._clients:
            connection = self.connection
            self._clients[id(loop)] = AsyncGillClient(
                connection.url, api_key=connection.api_key, tls=connection.tls, timeout=connection.timeout_s,
                retry=RetryPolicy(attempts=3, initial_backoff_s=0.25, max_backoff_s=1.0))
        return self._clients[id(loop)]

    async def respond(self, message: dict[str, Any] | None, session: Session, image_frequency: float,
                      max_words: float, temperature: float, steps: float, allow_retrieval: bool,
                      allow_generation: bool) -> AsyncIterator[tuple[Any, ...]]:
        """Stream one turn: yields (chatbot, textbox, preview, status, session) as events arrive."""
        text = ((message or {}).get("text") or "").strip()
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files") or []]
        if not text and not files:
            yield session.chat(), gr.update(), gr.update(), "*type a message or attach an image*", session
            return
        knobs = replace(self.knobs, image_frequency=float(image_frequency), max_words=int(max_words),
                        temperature=float(temperature), steps=int(steps), allow_retrieval=bool(allow_retrieval),
                        allow_generation=bool(allow_generation))
        history = session.history()
        exchange = Exchange.start(text, files)
        session.exchanges.append(exchange)
        hidden = gr.update(value=None, visible=False)
        yield session.chat(), None, hidden, "*writing…*", session
        exchange.stream = stream = self.client().chat([*history, exchange.user], knobs.options())
        try:
            async for event in stream:
                if exchange.ended:
                    break  # stopped from the page before this event arrived
                if isinstance(event, Preview):
                    yield (session.chat(), gr.update(), gr.update(value=event.pil(), visible=True),
                           f"*generating image {event.index + 1}: step {event.step} of {event.total_steps}…*",
                           session)
                    continue
                exchange.apply(event, self.folder, knobs.steps)
                status = done_line(event) if isinstance(event, Done) else gr.update()
                preview = hidden if isinstance(event, (ImageEvent, Done)) else gr.update()
                yield session.chat(), gr.update(), preview, status, session
        except GillClientError as error:
            if not exchange.ended:  # a failure, not the stop button's cancellation
                exchange.stop(f"*(failed: {error.message})*")
                gr.Warning(f"GILL server: {error}")
                yield session.chat(), gr.update(), hidden, f"**error:** {error}", session
                return
        if exchange.reply is None:
            # Stopped (Exchange.stop cancelled the request): this turn's last update says so, after any update it
            # sent before the click (the stop button's own update may reach the page before those).
            yield session.chat(), gr.update(), hidden, "*stopped*", session

    @staticmethod
    async def stop(session: Session) -> tuple[Any, ...]:
        """The stop button: marks the running turn stopped and cancels its request on the server (the turn then
        ends, showing the same). Runs in the event loop, like the turn it cancels."""
        if session.exchanges:
            session.exchanges[-1].stop()
        return session.chat(), gr.update(value=None, visible=False), "*stopped*", session

    @staticmethod
    def undo(session: Session) -> tuple[Any, ...]:
        """Remove the last exchange from the page and the conversation."""
        if session.exchanges:
            session.exchanges.pop()
        return session.chat(), "*removed the last exchange*", session

    @staticmethod
    def clear() -> tuple[Any, ...]:
        """Start a new conversation."""
        session = Session()
        return session.chat(), gr.update(value=None, visible=False), "*new conversation*", session

    def build(self) -> gr.Blocks:
        """Returns the page: chat, multimodal input, live preview, knobs, stop / undo / clear."""
        knobs = self.knobs
        with gr.Blocks(title="GILL") as app:
            gr.Markdown("## GILL: chat with text and images\nImages are retrieved from CC3M or generated with "
                        f"Stable Diffusion. Server: `{self.connection.url}`")
            session = gr.State(Session())
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="conversation", height=640, elem_id="chat")
                    box = gr.MultimodalTextbox(placeholder="Type a message; attach images with the clip",
                                               file_types=["image"], file_count="multiple", show_label=False,
                                               elem_id="message")
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        undo = gr.Button("Undo", elem_id="undo")
                        clear = gr.Button("Clear", elem_id="clear")
                    status = gr.Markdown("", elem_id="status")
                with gr.Column(scale=1):
                    preview = gr.Image(label="generating…", visible=False, elem_id="preview", interactive=False)
                    frequency = gr.Slider(0, max(10.0, knobs.image_frequency), value=knobs.image_frequency,
                                          step=0.1, label="image frequency (retrieval / generation scale)",
                                          elem_id="frequency")
                    words = gr.Slider(1, max(300, knobs.max_words), value=knobs.max_words, step=1,
                                      label="max words", elem_id="max-words")
                    temperature = gr.Slider(0, 2, value=knobs.temperature, step=0.05, label="temperature",
                                            elem_id="temperature")
                    steps = gr.Slider(1, max(200, knobs.steps), value=knobs.steps, step=1, label="denoising steps",
                                      elem_id="steps")
                    retrieval = gr.Checkbox(value=knobs.allow_retrieval, label="allow retrieval", elem_id="retrieval")
                    generation = gr.Checkbox(value=knobs.allow_generation, label="allow generation",
                                             elem_id="generation")
            turn = box.submit(self.respond, [box, session, frequency, words, temperature, steps, retrieval,
                                             generation], [chatbot, box, preview, status, session])
            stop.click(self.stop, [session], [chatbot, preview, status, session])
            undo.click(self.undo, [session], [chatbot, status, session])
            clear.click(self.clear, None, [chatbot, preview, status, session], cancels=[turn])
        # Turns spend their time waiting on the server: no limit here, Triton's queues and limits apply.
        app.queue(default_concurrency_limit=None)
        return app

    def launch(self, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
        """Serve the page on ``host:port`` (no share link): until interrupted, or with ``block=False`` in a
        background thread until the returned app is ``close()``d."""
        app = self.build()
        app.launch(server_name=host, server_port=port, share=False, allowed_paths=[str(self.folder)],
                   show_error=False, prevent_thread_lock=not block, quiet=not block)
        return app
