"""The ``gill`` command line: a thin layer over the library; every command fails with a readable message."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gill.cli_common import console, fail
from gill.errors import GillError
from gill.evaluation.commands import eval_app
from gill.options import DEFAULT_SCHEDULER
from gill.serving.progress import DEFAULT_STALL_S

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GILL: interleaved image-and-text dialogue.")


@app.command()
def describe(config: Annotated[Path, typer.Argument(help="model_args.json or a checkpoint directory")]) -> None:
    """Print the architecture and parameter counts without loading weights (meta device)."""
    from gill.describe import describe as build

    try:
        description = build(config)
    except GillError as error:
        fail(error)
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
        fail(error)
    for path in written:
        print(f"wrote {path}")


@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(help="checkpoint directory")],
    record: Annotated[bool, typer.Option(help="first write SHA256SUMS from the files as they are now (after a "
                                              "deliberate change)")] = False,
) -> None:
    """Check a checkpoint as gill serve does, but hash every file in SHA256SUMS again; then its shapes."""
    from gill.integrity import CHECKSUMS_FILE, verify_checkpoint, write_checksums

    try:
        if record:
            print(f"wrote {write_checksums(directory)}")
        result = verify_checkpoint(directory, full=not record)
    except GillError as error:
        fail(error)
    if result.listed:
        print(f"{CHECKSUMS_FILE}: {result.listed} files ok ({result.hashed} hashed, {result.hashed_bytes:,} bytes); "
              "shapes ok")
    else:
        print(f"no {CHECKSUMS_FILE}: required files and shapes ok, contents not checked "
              f"(gill verify {directory} --record writes one)")


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
        fail(error)
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
        fail(error)


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="cc3m_embeddings_urls.npy (official) or .npz / .parquet (ids, urls, "
                                              "captions, vectors)")],
    db: Annotated[str | None, typer.Option(help="a .db path (embedded milvus-lite) or http://host:19530 (a Milvus "
                                                "server); default: retrieval.db beside FILE")] = None,
    collection: Annotated[str, typer.Option(help="collection name")] = "gill_cc3m",
    captions: Annotated[Path | None, typer.Option(help="JSON {url: caption}; default: retrieval_captions.json "
                                                       "beside FILE when present")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Load retrieval vectors into Milvus: validated, normalised, batched, resumable, then indexed and loaded."""
    from gill.milvus import ingest as run_ingest
    from gill.milvus import read_corpus

    try:
        with console.status(f"reading {file}"):
            corpus = read_corpus(file, captions)
        uri = db or str(file.resolve().parent / "retrieval.db")
        console.print(f"{len(corpus):,} rows of {corpus.vectors.shape[1]}-d vectors -> {uri} ({collection})")
        report = run_ingest(corpus, uri, collection, progress=not quiet)
    except (GillError, OSError, ValueError) as error:
        fail(error)
    print(f"wrote {report.written:,} rows, {report.skipped:,} already present; {report.total:,} in {collection} "
          f"({report.insert_s:.1f} s); index {report.index} ({report.index_s:.1f} s); loaded")


@app.command("milvus-server")
def milvus_server(
    data: Annotated[Path, typer.Option(help="folder for its data, logs and binaries (250 MB of binaries; 18 GB "
                                            "after ingesting CC3M's 3.3M vectors)")] = Path("milvus-data"),
    port: Annotated[int, typer.Option(help="client port (its internal ports are found free near their "
                                           "defaults)")] = 19530,
) -> None:
    """Run Milvus standalone here (pip install the milvus-server extra) for CC3M-scale retrieval; Ctrl-C stops it.

    It listens on every interface (Milvus 2.3 has no listen-address setting): firewall its ports or run it in a
    container. Use its URI with gill ingest --db and gill serve --milvus-uri."""
    from gill import milvus_server as local

    try:
        with console.status(f"starting Milvus in {data}"):
            server = local.start(data, port)
    except GillError as error:
        fail(error)
    console.print(f"Milvus standalone serving {server.uri} (data and logs in {server.data_dir}); Ctrl-C stops it")
    console.print(f"  gill ingest cc3m_embeddings_urls.npy --db {server.uri}")
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        with console.status("stopping Milvus"):
            server.stop()
    if code:
        fail(GillError(f"Milvus exited with code {code}; see {server.data_dir / 'logs'}"))


@app.command()
def default_checkpoint() -> Path:
    """The checkpoint ``gill run`` and ``gill serve`` use without ``--checkpoint``: the committed pocket model."""
    from gill.pocket.default import pocket_checkpoint

    return pocket_checkpoint()


@app.command()
def run(
    text: Annotated[list[str], typer.Argument(
        help="the user's message (sent as 'Q: {text}\\nA:' like the reference demo); several make a conversation, "
             "one turn each, every reply (images included) kept in the history of the next")],
    image: Annotated[list[Path] | None, typer.Option(help="an input image, before the first text; repeatable")]
    = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the pocket model)")] = None,
    out: Annotated[Path, typer.Option(help="where images are saved")] = Path("outputs"),
    served: Annotated[bool, typer.Option(help="run the turn through a Triton server started for it")] = False,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    min_word_tokens: int = 0,
    ret_scale_factor: float = 1.0,
    gen_scale_factor: float = 1.0,
    guidance_scale: float = 7.5,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 50,
    scheduler: Annotated[str, typer.Option(
        help="denoising scheduler: pndm (the reference's, 50 steps) or dpm++ (DPM-Solver++, 20-25 steps)")]
    = DEFAULT_SCHEDULER,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (in-process; default: cuda if present)")]
    = None,
) -> None:
    """Run a dialogue, in-process or served: stream the text, save the images, say where each came from."""
    from gill import protocol
    from gill_client import ChatOptions, GillClient, GillClientError, user
    from gill_client.chat import Renderer
    from gill_client.events import from_proto
    from gill_client.messages import build_request
    from gill_client.reply import ReplyBuilder

    messages = [user(*(image or []), text[0])] + [user(later) for later in text[1:]]
    chat_options = ChatOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        min_word_tokens=min_word_tokens, ret_scale_factor=ret_scale_factor, gen_scale_factor=gen_scale_factor,
        guidance_scale=guidance_scale, num_inference_steps=steps, scheduler=scheduler)
    renderer = Renderer(out)
    try:
        options = protocol.options_from_request(build_request(messages[:1], chat_options))  # validates first
        checkpoint = checkpoint or default_checkpoint()
        out.mkdir(parents=True, exist_ok=True)
        if served:
            from gill.serving.server import TritonServer

            with console.status(f"starting Triton with {checkpoint}"):
                server = TritonServer(checkpoint)
                server.start()
            try:
                console.print(f"[dim]served at {server.endpoints.grpc}[/dim]")
                with GillClient(server.endpoints.grpc) as client:
                    conversation = client.conversation(chat_options)
                    for message in messages:
                        _show_question(renderer, message, len(messages))
                        stream = conversation.send(*message.parts)
                        for event in stream:
                            renderer(event)
            except GillClientError as error:
                raise GillError(str(error)) from None
            finally:
                server.stop()
        else:
            from gill.pipeline import Pipeline

            with console.status(f"loading {checkpoint}"):
                pipeline = Pipeline.from_checkpoint(checkpoint, device=device)
            history: list = []
            for message in messages:
                _show_question(renderer, message, len(messages))
                request = build_request([*history, message], chat_options)
                builder = ReplyBuilder()
                for event in pipeline.stream(protocol.parts_from_request(request), options,
                                             shown=protocol.shown_corpus_ids(request)):
                    wire = protocol.event_to_proto(event)
                    typed = from_proto(wire) if wire is not None else None
                    if typed is not None:
                        renderer(typed)
                        builder.add(typed)
                history += [message, builder.reply().as_message()]
    except (GillError, OSError) as error:
        fail(error)


def _show_question(renderer, message, turns: int) -> None:
    """Start a turn; in a conversation, print the question first so the transcript reads as one."""
    question = " ".join(part for part in message.parts if isinstance(part, str))
    renderer.start(f"Q: {question}\nA:" if turns > 1 else "")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def chat(context: typer.Context) -> None:
    """Talk to a running server: one message (gill chat "text" --image PATH) or a conversation (gill chat).
    Run gill chat --help for the options."""
    from gill_client.chat import main as chat_main

    raise typer.Exit(chat_main(context.args, prog="gill chat"))


@app.command()
def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the pocket model)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 to accept remote clients")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one)")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one)")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: a free one)")] = 8002,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every model to be ready")] = 600.0,
    api_key: Annotated[str | None, typer.Option(envvar="GILL_API_KEY", show_envvar=True,
                                                help="require this key on every call but health checks")] = None,
    milvus_uri: Annotated[str | None, typer.Option(help="retrieval corpus: a .db file (one process may open it) or "
                                                        "http://host:19530; default: <checkpoint>/retrieval.db "
                                                        "when present")] = None,
    collection: Annotated[str | None, typer.Option(help="Milvus collection (default gill_cc3m)")] = None,
    allow_private_urls: Annotated[bool, typer.Option(help="let retrieval fetch corpus images from private, "
                                                          "loopback and link-local addresses")] = False,
    api_key_file: Annotated[Path | None, typer.Option(help="read the API key from this file (keeps it out of "
                                                          "shell history)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve gRPC over TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    limit: Annotated[list[str] | None, typer.Option(help="a limit on one request, NAME=VALUE (repeatable), for "
                                                         "example max_new_tokens=256; names and defaults: "
                                                         "model_repository/README.md")] = None,
    parameter: Annotated[list[str] | None, typer.Option(help="a model parameter, MODEL.KEY=VALUE (repeatable), for "
                                                             "example llm.max_batch=16 or diffusion.max_batch=2; "
                                                             "see each model's config.pbtxt")] = None,
    stall_timeout: Annotated[float, typer.Option(help="seconds the llm or diffusion model may stay busy without a "
                                                      "step before its stub counts as stuck and is reloaded")]
    = DEFAULT_STALL_S,
    restarts: Annotated[int, typer.Option(help="times tritonserver is started again after it dies (a crash takes "
                                               "every model) within --restart-window; 0: exit at once, for a "
                                               "process supervisor to restart")] = 5,
    restart_window: Annotated[float, typer.Option(help="seconds over which --restarts are counted")] = 600.0,
) -> None:
    """Serve GILL with Triton: prepare the backend, start tritonserver, wait until every model is ready, and start
    tritonserver again if it dies."""
    import shutil
    import signal

    from gill.integrity import verify_checkpoint
    from gill.limits import Limits
    from gill.serving.server import ServeError, TritonServer, merge_parameters, parse_parameters
    from gill.serving.supervisor import CLEAN_EXITS, RestartPolicy, supervise
    try:
        policy = RestartPolicy(restarts, restart_window, timeout)
    except ValueError as error:
        fail(ServeError(f"--restarts must be >= 0 and --restart-window positive ({error})"))
    try:
        limits = Limits.from_assignments(limit or [])  # first: a typo in a limit fails before anything loads
        overrides = parse_parameters(parameter or [])
        checkpoint = checkpoint or default_checkpoint()
        if api_key_file is not None:
            try:
                api_key = api_key_file.read_text().strip()
            except OSError as error:
                raise ServeError(f"{api_key_file}: cannot read the API key ({error.strerror})") from None
        retrieval = {"milvus_uri": milvus_uri or "", "allow_private_urls": str(allow_private_urls).lower()}
        if collection:
            retrieval["collection"] = collection
        server = TritonServer(checkpoint, host, grpc_port, http_port, metrics_port, api_key=api_key,
                              parameters=merge_parameters({"retrieval": retrieval}, limits.model_parameters(),
                                                          overrides),
                              tls_cert=tls_cert, tls_key=tls_key, verify=False, stall_s=stall_timeout)
        verify_checkpoint(checkpoint)  # here rather than in start(): outside the spinner, hashing shows progress
        with console.status(f"starting Triton with {checkpoint} (log: {server.log_path})"):
            endpoints = server.start(timeout)
    except GillError as error:
        fail(error)
    scheme = "grpcs://" if server.tls else ""
    print(f"gRPC    {scheme}{endpoints.grpc}   (model 'gill': gill.v1.ChatRequest in, gill.v1.ChatEvent stream out)")
    print(f"HTTP    {endpoints.http}")
    print(f"metrics {endpoints.metrics}")
    print(f"log     {server.log_path}")
    if api_key:
        print("auth    API key required: gRPC header triton-grpc-protocol-x-api-key, HTTP header x-api-key "
              "(health checks stay open)")

    def shut_down(signum, frame) -> None:
        console.print(f"[dim]{signal.Signals(signum).name}: stopping Triton[/dim]")
        server.request_stop()

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    _log_watchdog(policy)
    code = supervise(server, policy)
    clean = code in CLEAN_EXITS
    if not clean:
        console.print(f"[red]tritonserver exited with code {code}[/red]; the end of its log:\n{server.log_excerpt()}")
    shutil.rmtree(server.work_dir, ignore_errors=True)
    raise typer.Exit(0 if clean else 1)


@app.command()
def demo(
    url: Annotated[str, typer.Option(envvar="GILL_URL", help="the server's gRPC address: host:port or "
                                                             "grpcs://host:port")] = "localhost:8001",
    host: Annotated[str, typer.Option(help="address the web page binds; 0.0.0.0 to accept remote browsers")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the web page")] = 7860,
    api_key: Annotated[str | None, typer.Option(envvar="GILL_API_KEY", show_envvar=True,
                                                help="the server's API key")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="read the API key from this file")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM certificate authority to trust: connect over TLS")] = None,
    image_frequency: Annotated[float, typer.Option(help="starting image frequency (retrieval and generation "
                                                        "scale factor)")] = 1.3,
    max_words: Annotated[int, typer.Option(help="starting max words (new tokens) of an answer")] = 150,
    temperature: Annotated[float, typer.Option(help="starting sampling temperature (0: greedy)")] = 0.6,
    steps: Annotated[int, typer.Option(help="starting denoising steps of a generated image")] = 50,
    min_word_tokens: Annotated[int | None, typer.Option(help="no image during an answer's first this many "
                                                             "tokens (default: the server's)")] = None,
    preview_every: Annotated[int, typer.Option(help="denoising steps between live previews (0: none)")] = 5,
    seed: Annotated[int | None, typer.Option(help="seed of sampling and diffusion (default: random)")] = None,
) -> None:
    """Serve a web chat (Gradio) with a running GILL server; it holds no model, only the client library."""
    try:
        if api_key_file is not None:
            api_key = api_key_file.read_text().strip()
        tls_settings = None
        if tls_ca is not None:
            from gill_client import TLS

            tls_settings = TLS.from_files(tls_ca)
        try:
            from gill.demo import Connection, Demo, Knobs
        except ImportError as error:
            raise ValueError(f"the web demo needs gradio ({error}): pip install 'gill[demo]'") from None

        knobs = Knobs(image_frequency=image_frequency, max_words=max_words, temperature=temperature, steps=steps,
                      min_word_tokens=min_word_tokens, preview_every=preview_every, seed=seed)
        app_demo = Demo(Connection(url, api_key, tls_settings or False), knobs)
    except (OSError, ValueError) as error:
        fail(error)
    print(f"web demo on http://{host}:{port} (GILL server: {url})", flush=True)
    app_demo.launch(host, port)
app.add_typer(eval_app, name="eval")


# ---------------------------------------------------------------------------------------------------- training


def _log_training(rank: int) -> None:
    """The training modules' progress messages to stderr, each tagged with the process's rank under torchrun."""
    import logging
    import sys

    class CurrentStderr(logging.StreamHandler):
        """Writes to sys.stderr as it is at each message (test runners swap it)."""

        gill_cli = True

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    training = logging.getLogger("gill.training")
    for old in [h for h in training.handlers if getattr(h, "gill_cli", False)]:
        training.removeHandler(old)  # a second command in one process (tests) must not print twice
    handler = CurrentStderr()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
    training.addHandler(handler)
    training.setLevel(logging.INFO if rank == 0 else logging.WARNING)


@app.command("train")
def train_command(
    checkpoint: Annotated[Path, typer.Option(help="base checkpoint directory: model_args.json and the frozen LM, "
                                                  "CLIP and SD it names; it must stay in place (exports refer "
                                                  "to it)")],
    train_data: Annotated[str, typer.Option(help="training pairs: a CC3M-format TSV (caption, image) or webdataset "
                                                 "shards as a brace pattern, e.g. 'shards/train-{000000..000099}"
                                                 ".tar'")],
    out_dir: Annotated[Path, typer.Option(help="train_state.pt, metrics.csv, tensorboard/, export/ and best/ go "
                                               "here")],
    val_data: Annotated[str | None, typer.Option(help="validation pairs (TSV or shards); without them there is no "
                                                      "validation and no best/")] = None,
    image_dir: Annotated[Path | None, typer.Option(help="folder the train TSV's image paths are relative to "
                                                        "(default: the TSV's folder)")] = None,
    val_image_dir: Annotated[Path | None, typer.Option(help="the same for the validation TSV (default: "
                                                            "--image-dir, else the TSV's folder)")] = None,
    targets_dir: Annotated[Path | None, typer.Option(help="SD targets from `gill preprocess-sd-targets`; without "
                                                          "them the generation loss is off")] = None,
    val_targets_dir: Annotated[Path | None, typer.Option(help="validation SD targets (default: --targets-dir)")]
    = None,
    steps: Annotated[int, typer.Option(help="optimiser steps (the reference: 10 epochs x 2000)")] = 20_000,
    batch_size: Annotated[int, typer.Option(help="pairs per step over all processes and micro-batches")] = 200,
    grad_accumulation: Annotated[int, typer.Option(help="micro-batches per step")] = 1,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.95,
    weight_decay: float = 0.01,
    warmup_steps: int = 2000,
    lr_step_size: Annotated[int, typer.Option(help="steps between x lr-gamma decays, counted after warm-up")]
    = 10_000,
    lr_gamma: float = 0.1,
    grad_clip: Annotated[float, typer.Option(help="maximum total gradient norm")] = 1.0,
    max_len: Annotated[int, typer.Option(help="tokens per caption, BOS and the 8 [IMG] tokens included")] = 32,
    concat_captions_prob: Annotated[float, typer.Option(help="chance a batch's captioning view pairs two "
                                                             "captions per sequence")] = 0.5,
    cap_loss_scale: float = 1.0,
    ret_loss_scale: float = 1.0,
    gen_loss_scale: float = 1.0,
    precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that has it, else fp32), fp32 or bf16: "
                                                "the frozen models' dtype; adapters stay fp32")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute the LM's activations in the backward "
                                                               "pass (less memory, more compute)")] = False,
    num_workers: Annotated[int, typer.Option(help="data loader workers per process")] = 4,
    seed: int = 0,
    log_every: Annotated[int, typer.Option(help="steps per metrics.csv / TensorBoard row")] = 10,
    val_every: Annotated[int, typer.Option(help="steps between validations and exports")] = 2000,
    save_every: Annotated[int, typer.Option(help="steps between train_state.pt saves")] = 1000,
    val_max_samples: Annotated[int | None, typer.Option(help="validate on the first N pairs only (default: "
                                                             "all)")] = None,
    val_batch_size: Annotated[int | None, typer.Option(help="validation pairs per forward (default: the "
                                                            "per-process micro-batch)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA when present, the "
                                                    "LOCAL_RANK GPU under torchrun)")] = None,
    fresh_adapters: Annotated[bool, typer.Option("--fresh-adapters/--finetune-adapters",
                                                 help="start from random adapters (a new model) or from the "
                                                      "checkpoint's")] = True,
    resume: Annotated[bool, typer.Option(help="continue OUT_DIR's train_state.pt exactly (start afresh when "
                                              "there is none)")] = False,
    shuffle_buffer: Annotated[int, typer.Option(help="shards only: per-worker sample shuffle buffer")] = 0,
    group_size: Annotated[int, typer.Option(help="TSV only: consecutive rows shuffled together into one batch "
                                                 "(hard negatives written side by side)")] = 1,
    tensorboard: Annotated[bool, typer.Option(help="also log to OUT_DIR/tensorboard")] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train GILL's adapters on caption-image pairs; multi-GPU with torchrun --nproc-per-node N -m gill.cli train."""
    import json
    import os

    from gill.training.trainer import TrainConfig, train

    rank = int(os.environ.get("RANK", "0"))
    _log_training(rank)
    text = {name: None if value is None else str(value) for name, value in
            dict(checkpoint=checkpoint, out_dir=out_dir, image_dir=image_dir, val_image_dir=val_image_dir,
                 targets_dir=targets_dir, val_targets_dir=val_targets_dir).items()}
    try:
        config = TrainConfig(
            train_data=train_data, val_data=val_data, steps=steps, batch_size=batch_size,
            grad_accumulation=grad_accumulation, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
            warmup_steps=warmup_steps, lr_step_size=lr_step_size, lr_gamma=lr_gamma, grad_clip=grad_clip,
            max_len=max_len, concat_captions_prob=concat_captions_prob, cap_loss_scale=cap_loss_scale,
            ret_loss_scale=ret_loss_scale, gen_loss_scale=gen_loss_scale, precision=precision,
            gradient_checkpointing=gradient_checkpointing, num_workers=num_workers, seed=seed,
            log_every=log_every, val_every=val_every, save_every=save_every, val_max_samples=val_max_samples,
            val_batch_size=val_batch_size, device=device, fresh_adapters=fresh_adapters, resume=resume,
            shuffle_buffer=shuffle_buffer, group_size=group_size, tensorboard=tensorboard, progress=not quiet,
            **text)
        result = train(config)
    except (GillError, OSError) as error:
        fail(error)
    if rank == 0:
        print(json.dumps(result.as_dict(), indent=2))
        console.print(f"trained to step {result.steps}; serving checkpoint: {result.export_dir}"
                      + (f", best (step {result.best_step}): {result.best_dir}" if result.best_dir else ""))


@app.command("train-decision")
def train_decision_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint whose LM gives the [IMG0] features (e.g. a "
                                                    "training run's export/)")],
    annotations: Annotated[Path, typer.Argument(help="PartiPrompts decision TSV: Prompt + Decisions (raw votes) "
                                                     "or Prompt + Decision (confident labels)")],
    output: Annotated[Path | None, typer.Option(help="write decision_model.safetensors here (default: into "
                                                     "CHECKPOINT)")] = None,
    steps: Annotated[int, typer.Option(help="full-batch AdamW steps")] = 2000,
    train_size: Annotated[int, typer.Option(help="the first N gen/ret rows train, the rest validate")] = 600,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 1337,
    batch_size: Annotated[int, typer.Option(help="prompts per LM forward while extracting features")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    write: Annotated[bool, typer.Option(help="write the head (--no-write: only report the metrics)")] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train the retrieve-or-generate head on annotated prompts; print its metrics as a table and JSON."""
    import json

    from gill.training.decision import DecisionTrainingConfig, train_decision

    try:
        config = DecisionTrainingConfig(train_size=train_size, steps=steps, learning_rate=learning_rate,
                                        weight_decay=weight_decay, seed=seed, batch_size=batch_size)
        result = train_decision(checkpoint, annotations, config, output=output, write=write, device=device,
                                progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    table = Table(title="decision head (0 = gen, 1 = ret)")
    for column in ("split", "macro-F1", "accuracy", "gen", "ret"):
        table.add_column(column, justify="left" if column == "split" else "right")
    counts = result.class_counts
    for name, metrics, split in (("train", result.train, "train"), ("validation", result.validation, "validation"),
                                 (f"always {result.majority} (baseline)", result.baseline, "validation")):
        table.add_row(name, f"{metrics.macro_f1:.3f}", f"{metrics.accuracy:.3f}", str(counts[split]["gen"]),
                      str(counts[split]["ret"]))
    Console(stderr=True).print(table)
    print(json.dumps(result.as_dict(), indent=2))


@app.command("preprocess-sd-targets")
def preprocess_sd_targets_command(
    data: Annotated[str, typer.Argument(help="a CC3M-format TSV or webdataset shards (brace pattern): only the "
                                             "captions are read")],
    checkpoint: Annotated[Path, typer.Option(help="checkpoint whose SD text encoder makes the targets")],
    out: Annotated[Path, typer.Option(help="folder of the .npy targets (give it to gill train --targets-dir)")],
    batch_size: Annotated[int, typer.Option(help="captions per text-encoder forward")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda ...")] = "cpu",
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Precompute the generation loss's targets: SD's text-encoder states of every caption (resumable)."""
    from gill.training.sd_targets import preprocess_sd_targets

    try:
        counts = preprocess_sd_targets(data, checkpoint, out, batch_size=batch_size, device=device,
                                       progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    print(f"wrote {counts.written:,} targets to {out}; {counts.skipped_existing:,} already complete, "
          f"{counts.failed:,} captions failed")


@app.command("make-shapes-data")
def make_shapes_data(
    out: Annotated[Path, typer.Argument(help="folder for train.tsv, val.tsv, images/ (and shards/)")],
    train: Annotated[int, typer.Option(help="training pairs")] = 512,
    val: Annotated[int, typer.Option(help="validation pairs")] = 64,
    image_size: Annotated[int, typer.Option(help="image side in pixels (the small preset's CLIP takes 224)")] = 32,
    seed: Annotated[int, typer.Option(help="the same seed writes the same bytes")] = 0,
    shards: Annotated[bool, typer.Option(help="also write webdataset shards")] = False,
    samples_per_shard: int = 100,
) -> None:
    """Write a synthetic caption-image dataset (coloured shapes) in the training data layouts, offline."""
    from gill.training.shapes import make_shapes_dataset

    try:
        dataset = make_shapes_dataset(out, train, val, image_size=image_size, seed=seed, shards=shards,
                                      samples_per_shard=samples_per_shard)
    except (GillError, OSError) as error:
        fail(error)
    print(f"wrote {dataset.train_tsv} ({train} pairs) and {dataset.val_tsv} ({val} pairs), images in "
          f"{dataset.image_dir / 'images'}")
    for split, written in (("train", dataset.train_shards), ("val", dataset.val_shards)):
        if written:
            print(f"{split} shards: {dataset.shard_pattern(split)}")


@app.command("make-pocket")
def make_pocket(
    directory: Annotated[Path, typer.Argument(help="where to build the pocket checkpoint")],
    seed: Annotated[int, typer.Option(help="random seed of the world and of every stage's training")] = 0,
    quick: Annotated[bool, typer.Option(help="a few steps of each stage: the layout, not the quality (tests)")]
    = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's); 1 is faster on a "
                                                     "machine busy with other work")] = None,
) -> None:
    """Train the pocket GILL from scratch on the CPU in the shapes world: LM, CLIP, Stable Diffusion, adapters,
    decision head (about 15 minutes on 2 cores; see docs/pocket.md)."""
    from gill.pocket.build import PocketConfig
    from gill.pocket.build import make_pocket as build

    config = PocketConfig(seed=seed)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        build(directory, config.quick() if quick else config)
    except (GillError, OSError) as error:
        fail(error)
    print(f"built the pocket checkpoint in {directory}; what each stage measured: {directory / 'pocket.json'}")


def _log_watchdog(policy) -> None:
    """The stub watchdog's reloads (gill/serving/watchdog.py) and tritonserver's restarts
    (gill/serving/supervisor.py) go to the terminal with a time stamp."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("gill.watchdog", "gill.supervisor"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    print("watch   a model whose backend process dies is reloaded (not ready meanwhile)")
    if policy.restarts:
        print(f"restart tritonserver is started again if it dies, up to {policy.restarts} times in "
              f"{policy.window_s:.0f} s")


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
