"""The ``gill`` command line: a thin layer over the library; every command fails with a readable message."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gill.errors import GillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GILL: interleaved image-and-text dialogue.")
console = Console(stderr=True)


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


@app.command()
def describe(config: Annotated[Path, typer.Argument(help="model_args.json or a checkpoint directory")]) -> None:
    """Print the architecture and parameter counts without loading weights (meta device)."""
    from gill.describe import describe as build

    try:
        description = build(config)
    except GillError as error:
        _fail(error)
    table = Table(title=f"GILL: {description.args.opt_version} + {description.args.visual_encoder}")
    for column in ("module", "structure", "parameters", "kind"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, note, count, kind in description.rows:
        table.add_row(name, note, f"{count:,}", kind)
    Console().print(table)
    print(f"trainable parameters: {description.total('trainable'):,}")
    print(f"frozen parameters: {description.total('frozen'):,}")


@app.command()
def convert(directory: Annotated[Path, typer.Argument(help="directory holding the official release files")]) -> None:
    """Convert the official pickles to safetensors/npz without executing pickled code."""
    from gill.convert import convert_directory

    try:
        written = convert_directory(directory)
    except GillError as error:
        _fail(error)
    for path in written:
        print(f"wrote {path}")


@app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="where to build the checkpoint")],
    seed: Annotated[int, typer.Option(help="random seed; the same seed gives the same weights")] = 0,
    preset: Annotated[str, typer.Option(help="tiny (tests) or small (OPT-125m/CLIP-B shapes, benchmarks)")] = "tiny",
) -> None:
    """Build a complete random-weight checkpoint offline, in the real layout."""
    from gill.tiny import make_checkpoint

    try:
        with console.status(f"building the {preset} checkpoint"):
            make_checkpoint(directory, seed=seed, preset=preset)
    except GillError as error:
        _fail(error)
    print(f"built {preset} checkpoint in {directory}")


@app.command()
def download(
    directory: Annotated[Path, typer.Argument(help="checkpoint directory to fill")],
    endpoint: Annotated[str | None, typer.Option(help="hub endpoint (default $HF_ENDPOINT or huggingface.co)")] = None,
    source_dir: Annotated[Path | None, typer.Option(help="copy from a local mirror <repo>/<path> instead")] = None,
    with_embeddings: Annotated[bool, typer.Option(help="also fetch the 2.9 GB CC3M retrieval embeddings")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Fetch the real weights (sha256-checked, resumable), then convert the official files."""
    from gill.convert import convert_directory
    from gill.download import download as fetch

    try:
        fetch(directory, endpoint=endpoint, source_dir=source_dir, include_embeddings=with_embeddings, quiet=quiet)
        for path in convert_directory(directory):
            print(f"wrote {path}")
    except GillError as error:
        _fail(error)


@app.command()
def run(
    text: Annotated[str, typer.Argument(help="the user's message")],
    image: Annotated[list[Path] | None, typer.Option(help="an input image, before the text; repeatable")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the tiny one)")] = None,
    out: Annotated[Path, typer.Option(help="where images are saved")] = Path("outputs"),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    min_word_tokens: int = 0,
    ret_scale_factor: float = 1.0,
    gen_scale_factor: float = 1.0,
    guidance_scale: float = 7.5,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 50,
    dialogue: Annotated[bool, typer.Option(help="wrap the text as 'Q: {text}\\nA:' like the reference demo")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present)")] = None,
) -> None:
    """Run one dialogue turn in-process: stream the text, save the images, say where each came from."""
    from gill.events import DiffusionPreview, Done, ImageResult, TextDelta
    from gill.options import GenerationOptions
    from gill.pipeline import Pipeline
    from gill.tiny import ensure_tiny_checkpoint

    try:
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            min_word_tokens=min_word_tokens, ret_scale_factor=ret_scale_factor, gen_scale_factor=gen_scale_factor,
            guidance_scale=guidance_scale, num_inference_steps=steps)
        if checkpoint is None:
            with console.status("building the tiny checkpoint (first use only)"):
                checkpoint = ensure_tiny_checkpoint()
        with console.status(f"loading {checkpoint}"):
            pipeline = Pipeline.from_checkpoint(checkpoint, device=device)
        parts: list = list(image or []) + [f"Q: {text}\nA:" if dialogue else text]
        out.mkdir(parents=True, exist_ok=True)
        for event in pipeline.stream(parts, options):
            if isinstance(event, TextDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, DiffusionPreview):
                console.print(f"[dim]denoising {event.step}/{event.total_steps}[/dim]")
            elif isinstance(event, ImageResult):
                path = out / f"image-{event.index}-{event.source}.png"
                event.image.save(path)
                where = f" from {event.url}" if event.url else ""
                probabilities = (f", p(gen)={event.probabilities[0]:.2f} p(ret)={event.probabilities[1]:.2f}"
                                 if event.probabilities else "")
                print(f"\n[image {event.index}: {event.source}{where}, score {event.score:.3f}"
                      f"{probabilities} -> {path}]")
            elif isinstance(event, Done):
                print()
                console.print(f"[dim]{event.generated_tokens} tokens, stop: {event.stop_reason}, "
                              f"{event.timings.get('total_s', 0):.2f} s[/dim]")
    except GillError as error:
        _fail(error)


def _quiet_libraries() -> None:
    """Progress bars of weight loading would drown the streamed text."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main() -> None:
    _quiet_libraries()
    app()


if __name__ == "__main__":
    main()
