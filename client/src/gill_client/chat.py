"""``gill-chat`` (and ``gill chat``): talk to a GILL server from a terminal.

    gill-chat "show me a red circle" --image photo.jpg     # one turn, then exit
    gill-chat                                              # a conversation: type messages, /help for commands

Text streams as it arrives, generation shows its progress, and every image is saved under ``--out`` with its
path, source and score printed. ``--url`` (or ``$GILL_URL``) is the server's gRPC address, ``--api-key`` (or
``$GILL_API_KEY``) its key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from gill_client._transport import TLS
from gill_client.errors import GillClientError
from gill_client.events import Done, Event, ImageEvent, Notice, Preview, TextDelta
from gill_client.messages import Part, user
from gill_client.options import ChatOptions, RetryPolicy
from gill_client.sync import GillClient

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation
  /help         this help
  /quit         leave (or Ctrl-D); Ctrl-C stops the answer being written"""


class Renderer:
    """Prints one turn's events: text to ``out`` as it streams, generation progress and image lines to ``err``;
    images are saved under ``folder`` as ``turn{N}-image{I}-{source}.png``."""

    def __init__(self, folder: Path, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.folder = folder
        self.out = out if out is not None else sys.stdout  # looked up now: callers may have redirected them
        self.err = err if err is not None else sys.stderr
        self.turn = 0
        self._progress = False
        self.saved: list[Path] = []

    def start(self, prefix: str = "") -> None:
        """Begin a new turn (numbering its image files), writing ``prefix`` before the answer."""
        self.turn += 1
        if prefix:
            self.out.write(prefix)
            self.out.flush()

    def __call__(self, event: Event) -> None:
        """Show one event."""
        if isinstance(event, TextDelta):
            self._end_progress()
            self.out.write(event.text)
            self.out.flush()
        elif isinstance(event, Preview):
            line = f"[generating image {event.index}: step {event.step}/{event.total_steps}]"
            if self.err.isatty():
                self.err.write(f"\r{line}")
                self._progress = True
            else:
                self.err.write(line + "\n")
            self.err.flush()
        elif isinstance(event, ImageEvent):
            self._end_progress()
            path = event.save(self.folder / f"turn{self.turn}-image{event.index}-{event.source}.png")
            self.saved.append(path)
            self.out.write(f"\n{describe_image(event)} -> {path}\n")
            self.out.flush()
        elif isinstance(event, Notice):
            self._end_progress()
            self.err.write(f"\n[note on image {event.index}: {event.message}]\n")
            self.err.flush()
        elif isinstance(event, Done):
            self._end_progress()
            total = event.timings.get("total_s")
            took = f", {total:.2f} s" if total is not None else ""
            self.out.write("\n")
            self.err.write(f"[{event.generated_tokens} tokens, stop: {event.stop_reason}{took}]\n")
            self.out.flush()
            self.err.flush()

    def _end_progress(self) -> None:
        if self._progress:
            self.err.write("\r\x1b[K")
            self._progress = False


def describe_image(event: ImageEvent) -> str:
    """Returns a one-line description of an image event: index, source, url, score and decision."""
    where = f" from {event.url}" if event.url else ""
    caption = f" ({event.caption!r})" if event.caption else ""
    score = f", score {event.score:.3f}" if event.score is not None else ""
    decision = (f", p(generate)={event.p_generate:.2f} p(retrieve)={event.p_retrieve:.2f}"
                if event.p_generate is not None and event.p_retrieve is not None else "")
    return f"[image {event.index}: {event.source}{where}{caption}{score}{decision}]"


def build_parser(prog: str = "gill-chat") -> argparse.ArgumentParser:
    """Returns the command-line parser of ``gill-chat`` (shown as ``prog``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("text", nargs="?", help="send this one message and exit (omit for a conversation)")
    parser.add_argument("--image", action="append", type=Path, default=[], metavar="PATH",
                        help="an image sent before the text; repeatable")
    parser.add_argument("--url", default=os.environ.get("GILL_URL", "localhost:8001"),
                        help="server gRPC address: host:port or grpcs://host:port (default $GILL_URL or "
                             "localhost:8001)")
    parser.add_argument("--api-key", default=os.environ.get("GILL_API_KEY"),
                        help="the server's API key (default $GILL_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by grpcs://)")
    parser.add_argument("--ca", type=Path, help="PEM file of the certificate authority to trust (TLS)")
    parser.add_argument("--cert", type=Path, help="client certificate chain, PEM (mutual TLS)")
    parser.add_argument("--key", type=Path, help="client private key, PEM (mutual TLS)")
    parser.add_argument("--out", type=Path, default=Path("gill-images"), help="where images are saved")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a turn may take")
    parser.add_argument("--retries", type=int, default=3, help="retries while the server cannot be reached")
    sampling = parser.add_argument_group("generation options (unset: the server's defaults)")
    sampling.add_argument("--max-new-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--min-word-tokens", type=int)
    sampling.add_argument("--ret-scale-factor", type=float)
    sampling.add_argument("--gen-scale-factor", type=float)
    sampling.add_argument("--max-images", type=int)
    sampling.add_argument("--guidance-scale", type=float)
    sampling.add_argument("--steps", dest="num_inference_steps", type=int, help="denoising steps")
    sampling.add_argument("--scheduler", choices=("pndm", "dpm++"),
                          help="denoising scheduler: pndm (the reference's, 50 steps) or dpm++ (20-25 steps)")
    sampling.add_argument("--no-retrieval", dest="allow_retrieval", action="store_false", default=None)
    sampling.add_argument("--no-generation", dest="allow_generation", action="store_false", default=None)
    sampling.add_argument("--preview-every", type=int, default=5,
                          help="show generation progress every this many denoising steps (0: none)")
    return parser


def options_from(args: argparse.Namespace) -> ChatOptions:
    """Returns the :class:`ChatOptions` the parsed arguments ask for."""
    names = ("max_new_tokens", "temperature", "top_p", "seed", "min_word_tokens", "ret_scale_factor",
             "gen_scale_factor", "max_images", "guidance_scale", "num_inference_steps", "allow_retrieval",
             "allow_generation", "preview_every", "scheduler")
    return ChatOptions(**{name: getattr(args, name) for name in names})


def client_from(args: argparse.Namespace) -> GillClient:
    """Returns the :class:`GillClient` the parsed arguments describe."""
    tls: bool | TLS = args.tls
    if args.ca or args.cert or args.key:
        tls = TLS.from_files(args.ca, args.key, args.cert)
    return GillClient(args.url, api_key=args.api_key, tls=tls, timeout=args.timeout,
                      retry=RetryPolicy(attempts=max(1, args.retries + 1)), options=options_from(args))


def one_shot(client: GillClient, text: str, images: Sequence[Path], renderer: Renderer) -> int:
    """Send one message; returns the exit code (0 done, 1 failed, 130 interrupted)."""
    parts: list[Part] = [*images, text]
    renderer.start()
    try:
        for event in client.chat(user(*parts)):
            renderer(event)
    except GillClientError as error:
        renderer.err.write(f"\nerror: {error}\n")
        return 1
    except KeyboardInterrupt:
        renderer.err.write("\n[cancelled]\n")
        return 130
    return 0


def repl(client: GillClient, lines: Iterable[str], renderer: Renderer, interactive: bool) -> int:
    """Hold a conversation over ``lines`` (stdin); returns 0 at the end of input or ``/quit``."""
    conversation = client.conversation()
    pending: list[Part] = []
    if interactive:
        renderer.err.write(f"talking to {client.target}; /help for commands, Ctrl-D to leave\n")
    iterator = iter(lines)
    while True:
        if interactive:
            renderer.out.write("you> ")
            renderer.out.flush()
        try:
            line = next(iterator)
        except (StopIteration, KeyboardInterrupt):
            if interactive:
                renderer.out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/quit":
                return 0
            if command == "/reset":
                conversation.reset()
                pending.clear()
                renderer.err.write("[conversation forgotten]\n")
            elif command == "/image" and argument.strip():
                path = Path(argument.strip()).expanduser()
                if path.is_file():
                    pending.append(path)
                    renderer.err.write(f"[{path} attached to your next message]\n")
                else:
                    renderer.err.write(f"error: {path}: no such file\n")
            else:
                renderer.err.write(HELP + "\n")
            continue
        renderer.start("gill> " if interactive else "")
        try:
            for event in conversation.send(*pending, line):
                renderer(event)
            pending.clear()
        except GillClientError as error:
            renderer.err.write(f"\nerror: {error}\n")
        except KeyboardInterrupt:
            renderer.err.write("\n[cancelled; the conversation is as it was before this message]\n")


def main(argv: Sequence[str] | None = None, prog: str = "gill-chat") -> int:
    """Run ``gill-chat`` on ``argv`` (default: the command line); returns the process exit code (0 done,
    1 a turn failed, 2 bad usage, 130 interrupted)."""
    args = build_parser(prog).parse_args(argv)
    for path in args.image:
        if not path.is_file():
            print(f"error: {path}: no such image file", file=sys.stderr)
            return 2
    try:
        client = client_from(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    renderer = Renderer(args.out)
    with client:
        if args.text is not None:
            return one_shot(client, args.text, args.image, renderer)
        if args.image:
            print("error: --image needs a message; in a conversation use /image PATH", file=sys.stderr)
            return 2
        return repl(client, sys.stdin, renderer, sys.stdin.isatty())


if __name__ == "__main__":
    sys.exit(main())
