"""``gill eval ...``: the paper's evaluations, one command each (docs/evaluation.md). Registered by gill.cli."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from gill.cli_common import console, fail
from gill.errors import GillError

eval_app = typer.Typer(no_args_is_help=True, help="Reproduce the paper's evaluations (docs/evaluation.md).")

_URL_HELP = ("the served model's gRPC address, host:port or grpcs://host:port (`gill serve`), instead of "
             "--checkpoint: generate through gill_client")
_API_KEY_HELP = "the server's API key (with --url)"
_CONTEXT_HELP = ("context given before the forced image: captions-images (5 captions + 4 images), captions (the 5 "
                 "captions), caption (the 5th caption); repeatable")


def _eval_inputs(sis: Path, images: Path | None, checkpoint: Path, device: str | None, generation: bool):
    """The split, its image folder and the in-process pipeline (retrieval corpus never loaded, as the reference)."""
    from gill.evaluation.datasets import ImageFolder, read_vist_sis

    split = read_vist_sis(sis)
    folder = ImageFolder(images or sis.parent / "val_images")
    return split, folder, _eval_pipeline(checkpoint, device, generation)


def _eval_header(name: str, data: Path, checkpoint: Path | None, device: str | None, dataset: str = "VIST SIS",
                 served: dict | None = None) -> dict:
    """The result's header: what was evaluated, and by which model: the ``checkpoint``'s identity in-process, or
    ``served`` (:meth:`~gill.evaluation.generation.ServedGenerator.identity`) for a ``--url`` run."""
    from gill.evaluation.report import checkpoint_identity, started, versions

    model = {"served": served} if served is not None else {"checkpoint": checkpoint_identity(checkpoint)}
    return {"eval": name, "dataset": {"name": dataset, "path": str(data.resolve())},
            **model, "versions": versions(), "device": device or "auto", **started()}


def _require_one_model(checkpoint: Path | None, url: str | None) -> None:
    from gill.errors import InputError

    if (checkpoint is None) == (url is None):
        raise InputError("give exactly one of --checkpoint DIR (the model in-process) or --url HOST:PORT (the served "
                         f"model); got {'both' if checkpoint is not None else 'neither'}")


@contextmanager
def _generator(checkpoint: Path | None, url: str | None, api_key: str | None, device: str | None
               ) -> Iterator[tuple]:
    """Yields the eval's image generator and the ``served`` identity (None in-process): the in-process pipeline
    of ``checkpoint``, or the served model at ``url`` (connection closed on exit)."""
    from gill.evaluation.generation import client_generator, pipeline_generator

    if url is not None:
        with console.status(f"connecting to {url}"):
            served = client_generator(url, api_key)
            identity = served.identity()
        with served:
            yield served, identity
    else:
        assert checkpoint is not None
        yield pipeline_generator(_eval_pipeline(checkpoint, device, generation=True)), None


@eval_app.command("vist")
def eval_vist(
    sis: Annotated[Path, typer.Argument(help="the VIST SIS split in its official format, e.g. "
                                             "sis/val.story-in-sequence.json")],
    clip: Annotated[Path, typer.Option(help="local copy of openai/clip-vit-large-patch14 (the full CLIPModel): "
                                            "the CLIP similarity model")],
    checkpoint: Annotated[Path | None, typer.Option(help="GILL checkpoint directory (in-process; or --url)")] = None,
    url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GILL_API_KEY", show_envvar=True, help=_API_KEY_HELP)] = None,
    images: Annotated[Path | None, typer.Option(help="folder of <photo_flickr_id>.png (default: val_images "
                                                     "beside SIS)")] = None,
    lpips_alexnet: Annotated[Path | None, typer.Option(help="torchvision's ImageNet AlexNet state dict "
                                                            "(alexnet-owt-7be5be79.pth), the LPIPS trunk; without "
                                                            "it LPIPS is not computed")] = None,
    out: Annotated[Path, typer.Option(help="result.json, result.md and the generated images go here")]
    = Path("outputs/eval/vist"),
    context: Annotated[list[str] | None, typer.Option(help=_CONTEXT_HELP)] = None,
    max_stories: Annotated[int | None, typer.Option(help="only the first N usable stories")] = None,
    seed: Annotated[int, typer.Option(help="diffusion seed of every story (the reference's: 42)")] = 42,
    steps: Annotated[int, typer.Option(help="denoising steps (the reference's: 50)")] = 50,
    guidance_scale: float = 7.5,
    scheduler: Annotated[str, typer.Option(help="pndm (the reference's) or dpm++")] = "pndm",
    grid_stories: Annotated[int, typer.Option(help="stories drawn in grid.png (context photos, generated image, "
                                                   "truth); 0: no grid")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """VIST contextual image generation (paper Table 1): CLIP similarity and LPIPS of the forced 5th image."""
    from gill.evaluation import report
    from gill.evaluation.datasets import ImageFolder, read_vist_sis
    from gill.evaluation.generation import load_metrics, metrics_section
    from gill.evaluation.plots import GRID_FILE, vist_grid
    from gill.evaluation.vist import VistSettings, evaluate_vist

    try:
        _require_one_model(checkpoint, url)
        settings = VistSettings(contexts=tuple(context or ("captions-images",)), seed=seed,
                                guidance_scale=guidance_scale, num_inference_steps=steps, scheduler=scheduler,
                                max_stories=max_stories)
        metric, distance = load_metrics(clip, lpips_alexnet, device)
        split = read_vist_sis(sis)
        folder = ImageFolder(images or sis.parent / "val_images")
        with _generator(checkpoint, url, api_key, device) as (generate, served):
            header = _eval_header("vist", sis, checkpoint, device, served=served)
            body = evaluate_vist(split, folder, generate, metric, distance, settings, out, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    result = header | metrics_section(metric, distance) | body
    json_path, markdown_path = report.write(out, result, report.vist_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")
    try:
        grid = vist_grid(split, folder, body["stories"], settings.contexts, out / "generated", grid_stories,
                         settings.squash_size)
    except GillError as error:
        fail(error)
    if grid is not None:
        grid.save(out / GRID_FILE)
        print(f"wrote {out / GRID_FILE}")


@eval_app.command("retrieval")
def eval_retrieval(
    sis: Annotated[Path, typer.Argument(help="the VIST SIS split in its official format")],
    checkpoint: Annotated[Path, typer.Option(help="GILL checkpoint directory (in-process)")],
    images: Annotated[Path | None, typer.Option(help="folder of <photo_flickr_id>.png (default: val_images "
                                                     "beside SIS)")] = None,
    out: Annotated[Path, typer.Option(help="result.json and result.md go here")] = Path("outputs/eval/retrieval"),
    context: Annotated[list[str] | None, typer.Option(help=_CONTEXT_HELP)] = None,
    max_stories: Annotated[int | None, typer.Option(help="only the first N usable stories")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """VIST contextual image retrieval (paper Table 5): recall@1/5/10 among the split's photos."""
    from gill.evaluation import report
    from gill.evaluation.retrieval import RetrievalSettings, evaluate_vist_retrieval

    try:
        settings = RetrievalSettings(contexts=tuple(context or ("captions-images",)), max_stories=max_stories)
        header = _eval_header("vist_retrieval", sis, checkpoint, device)
        split, folder, pipeline = _eval_inputs(sis, images, checkpoint, device, generation=False)
        body = evaluate_vist_retrieval(split, folder, pipeline, settings, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    result = header | body
    json_path, markdown_path = report.write(out, result, report.retrieval_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")


@eval_app.command("fetch-vist")
def eval_fetch_vist(
    sis: Annotated[Path, typer.Argument(help="the VIST SIS split in its official format")],
    out: Annotated[Path | None, typer.Option(help="folder the photos go to as <photo id>.png (default: val_images "
                                                  "beside SIS, where the eval commands look)")] = None,
    workers: Annotated[int, typer.Option(help="photos fetched at once")] = 8,
    timeout: Annotated[float, typer.Option(help="seconds allowed for one URL, connect to last byte")] = 30.0,
    retries: Annotated[int, typer.Option(help="further tries after a timeout, dropped connection, 429 or 5xx")] = 2,
    max_bytes: Annotated[int, typer.Option(help="larger photos are refused")] = 32 * 1024 * 1024,
    size: Annotated[int, typer.Option(help="squash to SIZE x SIZE as the reference (224); 0 keeps the original "
                                           "size")] = 224,
    max_photos: Annotated[int | None, typer.Option(help="only the first N photos of the split")] = None,
    allow_private_addresses: Annotated[bool, typer.Option(
        "--allow-private-addresses", help="also fetch from private and loopback addresses (a mirror on your own "
                                          "network); refused by default")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Download the photos of a VIST split (bounded, resumable); failures are listed in missing.json."""
    from gill.evaluation.datasets import read_vist_sis
    from gill.evaluation.fetch_vist import MISSING_FILE, FetchSettings, fetch_vist_photos

    folder = out or sis.parent / "val_images"
    try:
        settings = FetchSettings(workers=workers, timeout_s=timeout, retries=retries, max_bytes=max_bytes,
                                 size=size, max_photos=max_photos, allow_private=allow_private_addresses)
        split = read_vist_sis(sis)
        summary = fetch_vist_photos(split, folder, settings, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    print(f"{summary.photos} photos: {summary.present} already present, {summary.fetched} fetched, "
          f"{summary.failed} failed ({summary.no_url} without a URL); {summary.retried} retries; "
          f"{summary.fallback_urls} from a smaller size than url_o")
    print(f"photos in {folder}; failures listed in {folder / MISSING_FILE}")
    if summary.failed and summary.failed == summary.photos:
        console.print("[red]error:[/red] no photo could be fetched; see the reasons in "
                      f"{folder / MISSING_FILE}")
        raise typer.Exit(1)


@eval_app.command("cc3m-retrieval")
def eval_cc3m_retrieval(
    val_tsv: Annotated[Path, typer.Argument(help="CC3M validation set in the training TSV format (tab-separated, "
                                                 "header with 'caption' and 'image')")],
    checkpoint: Annotated[Path, typer.Option(help="GILL checkpoint directory")],
    images: Annotated[Path | None, typer.Option(help="folder the TSV's 'image' paths are relative to (default: "
                                                     "the TSV's folder)")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="only the first N rows of the TSV")] = None,
    out: Annotated[Path, typer.Option(help="result.json and result.md go here")] = Path("outputs/eval/cc3m"),
    batch_size: Annotated[int, typer.Option(help="pairs per forward")] = 32,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers decoding images")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """CC3M-val text-to-image (and image-to-text) recall@1/5/10, as training validation scores retrieval."""
    from gill.evaluation import report
    from gill.evaluation.cc3m import Cc3mSettings, cc3m_markdown, evaluate_cc3m_retrieval
    from gill.training.data import CaptionImageTSV, SampleEncoder
    from gill.training.objective import GILLObjective

    try:
        settings = Cc3mSettings(max_pairs=max_pairs, batch_size=batch_size, num_workers=num_workers)
        header = _eval_header("cc3m_retrieval", val_tsv, checkpoint, device, dataset="CC3M validation")
        with console.status(f"loading {checkpoint}"):
            encoder = SampleEncoder.from_checkpoint(checkpoint)
            dataset = CaptionImageTSV(val_tsv, encoder, image_dir=images)
            objective = GILLObjective.from_checkpoint(checkpoint, device=device)
        body = evaluate_cc3m_retrieval(objective, dataset, settings, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    result = header | {"images": str((images or val_tsv.parent).resolve())} | body
    json_path, markdown_path = report.write(out, result, cc3m_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")


def _eval_pipeline(checkpoint: Path, device: str | None, generation: bool):
    """The in-process pipeline of an eval (retrieval corpus never loaded, as the reference)."""
    from gill.pipeline import Pipeline

    with console.status(f"loading {checkpoint}"):
        return Pipeline.from_checkpoint(checkpoint, device=device, load_retrieval=False, load_diffusion=generation)


@eval_app.command("visdial")
def eval_visdial(
    dialogs: Annotated[Path, typer.Argument(help="VisDial v1.0 dialogs in the official format, e.g. "
                                                 "visdial_1.0_val.json")],
    clip: Annotated[Path, typer.Option(help="local copy of openai/clip-vit-large-patch14 (the full CLIPModel): "
                                            "the CLIP similarity model")],
    checkpoint: Annotated[Path | None, typer.Option(help="GILL checkpoint directory (in-process; or --url)")] = None,
    url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GILL_API_KEY", show_envvar=True, help=_API_KEY_HELP)] = None,
    images: Annotated[Path | None, typer.Option(help="folder of the dialogs' images, VisualDialog_val2018_<12-digit "
                                                     "id>.jpg or <image_id>.jpg/.png (default: VisualDialog_<split>"
                                                     "2018 beside DIALOGS)")] = None,
    lpips_alexnet: Annotated[Path | None, typer.Option(help="torchvision's ImageNet AlexNet state dict "
                                                            "(alexnet-owt-7be5be79.pth), the LPIPS trunk; without "
                                                            "it LPIPS is not computed")] = None,
    out: Annotated[Path, typer.Option(help="result.json, result.md and the generated images go here")]
    = Path("outputs/eval/visdial"),
    rounds: Annotated[list[int] | None, typer.Option(help="rounds of dialogue fed before the forced image (the "
                                                          "paper's 1, 5, 10; default 10); repeatable")] = None,
    caption: Annotated[bool, typer.Option(help="put the caption first (a variant; the reference feeds the rounds "
                                               "only)")] = False,
    max_dialogs: Annotated[int | None, typer.Option(help="only the first N usable dialogs")] = None,
    seed: Annotated[int, typer.Option(help="diffusion seed of every dialog (the reference's: 42)")] = 42,
    steps: Annotated[int, typer.Option(help="denoising steps (the reference's: 50)")] = 50,
    guidance_scale: float = 7.5,
    scheduler: Annotated[str, typer.Option(help="pndm (the reference's) or dpm++")] = "pndm",
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """VisDial contextual image generation (paper Table 2): CLIP similarity and LPIPS after 1/5/10 rounds."""
    from gill.evaluation import report
    from gill.evaluation.generation import load_metrics, metrics_section
    from gill.evaluation.visdial import VisdialSettings, evaluate_visdial
    from gill.evaluation.visdial_data import VisdialImages, read_visdial

    try:
        _require_one_model(checkpoint, url)
        settings = VisdialSettings(rounds=tuple(rounds or (10,)), include_caption=caption, seed=seed,
                                   guidance_scale=guidance_scale, num_inference_steps=steps, scheduler=scheduler,
                                   max_dialogs=max_dialogs)
        split = read_visdial(dialogs)
        folder = VisdialImages(images or dialogs.parent / f"VisualDialog_{split.split or 'val'}2018", split.split)
        metric, distance = load_metrics(clip, lpips_alexnet, device)
        with _generator(checkpoint, url, api_key, device) as (generate, served):
            header = _eval_header("visdial", dialogs, checkpoint, device, served=served,
                                  dataset=f"VisDial v{split.version or '?'} {split.split or '?'}")
            body = evaluate_visdial(split, folder, generate, metric, distance, settings, out, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    result = header | metrics_section(metric, distance) | body
    if caption:
        result["notes"].append("caption fed before the rounds: not the paper's prompt, not comparable to Table 2")
    json_path, markdown_path = report.write(out, result, report.visdial_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")


@eval_app.command("fid")
def eval_fid(
    reference: Annotated[Path, typer.Option(help="folder of real images (e.g. COCO val2014); its statistics are "
                                                 "computed once and cached")],
    captions: Annotated[Path | None, typer.Option(help="MS-COCO captions JSON (captions_val2014.json): generate one "
                                                       "image per sampled caption, then score them")] = None,
    generated: Annotated[Path | None, typer.Option(help="score the images in this folder instead of generating")]
    = None,
    checkpoint: Annotated[Path | None, typer.Option(help="GILL checkpoint directory (with --captions; or --url)")]
    = None,
    url: Annotated[str | None, typer.Option(help=_URL_HELP + " (with --captions)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GILL_API_KEY", show_envvar=True, help=_API_KEY_HELP)] = None,
    inception: Annotated[Path | None, typer.Option(help="clean-fid's inception-2015-12-05.pt (TorchScript; default "
                                                        "$GILL_HOME/inception-2015-12-05.pt)")] = None,
    mode: Annotated[str, typer.Option(help="clean-fid mode: clean or legacy_tensorflow")] = "clean",
    stats_cache: Annotated[Path | None, typer.Option(help="where reference statistics are kept (default: "
                                                          "$GILL_HOME/fid-stats)")] = None,
    out: Annotated[Path, typer.Option(help="result.json, result.md and images/ (generated) go here")]
    = Path("outputs/eval/fid"),
    max_captions: Annotated[int, typer.Option(help="captions sampled (the usual zero-shot setting: 30000)")] = 30_000,
    seed: Annotated[int, typer.Option(help="caption sampling seed; caption i's diffusion seed is seed + i")] = 42,
    steps: Annotated[int, typer.Option(help="denoising steps (the reference's: 50)")] = 50,
    guidance_scale: float = 7.5,
    scheduler: Annotated[str, typer.Option(help="pndm (the reference's) or dpm++")] = "pndm",
    resume: Annotated[bool, typer.Option(help="keep the images already in --out/images (an interrupted run)")]
    = False,
    batch_size: Annotated[int, typer.Option(help="images per Inception forward")] = 32,
    workers: Annotated[int, typer.Option(help="image-loading processes (clean-fid resizes there; 0: in this "
                                              "process)")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """FID (clean-fid) of generated images against cached statistics of real ones (MS-COCO zero-shot: 12.2)."""
    from gill.errors import InputError
    from gill.evaluation import fid, report
    from gill.tiny import default_home

    try:
        if (captions is None) == (generated is None):
            raise InputError("give either --captions FILE (generate, then score) or --generated DIR (score only)")
        if captions is not None and checkpoint is None and url is None:
            raise InputError("--captions needs --checkpoint DIR or --url HOST:PORT: the model that generates the "
                             "images")
        if checkpoint is not None and url is not None:
            _require_one_model(checkpoint, url)
        if captions is None and (checkpoint is not None or url is not None):
            raise InputError("--generated scores existing images: --checkpoint and --url are for --captions")
        fid.check_mode(mode)
        extractor = fid.InceptionFeatures.from_file(inception or default_home() / fid.INCEPTION_FILE, mode, device)
        fid.image_files(reference, "--reference")  # before hours of generation: a bad folder fails now
        header = {"eval": "fid", "versions": report.versions(), "device": device or "auto", **report.started()}
        settings: dict = {"mode": mode, "batch_size": batch_size}
        if captions is not None:
            generation_settings = fid.FidGenerationSettings(max_captions=max_captions, seed=seed,
                                                            guidance_scale=guidance_scale, num_inference_steps=steps,
                                                            scheduler=scheduler)
            chosen = fid.sample_captions(fid.read_coco_captions(captions), max_captions, seed)
            header |= {"dataset": {"name": "MS-COCO captions", "path": str(captions.resolve())}}
            settings |= fid.settings_record(generation_settings)
            generated = out / "images"
            with _generator(checkpoint, url, api_key, device) as (generate, served):
                header |= ({"served": served} if served is not None
                           else {"checkpoint": report.checkpoint_identity(checkpoint)})
                header["generation"] = fid.generate_for_captions(chosen, generate, generation_settings, generated,
                                                                 resume, not quiet)
        body = fid.fid_against_reference(generated, reference, extractor, mode,
                                         stats_cache or default_home() / "fid-stats", batch_size, workers, not quiet)
    except (GillError, OSError) as error:
        fail(error)
    notes = [] if isinstance(extractor, fid.InceptionFeatures) else [
        "the feature extractor is not clean-fid's Inception: FID not comparable to published numbers"]
    result = header | {"generated_path": str(generated.resolve()), "fid_tool": extractor.describe(),
                       "settings": settings, "results": body, "notes": notes}
    json_path, markdown_path = report.write(out, result, report.fid_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")


@eval_app.command("decision")
def eval_decision(
    checkpoint: Annotated[Path, typer.Argument(help="GILL checkpoint directory with a decision head "
                                                    "(decision_model.safetensors)")],
    annotations: Annotated[Path, typer.Argument(help="PartiPrompts decision TSV: Prompt + Decisions (raw votes) "
                                                     "or Prompt + Decision (confident labels)")],
    split: Annotated[str, typer.Option(help="validation (the confident rows after the first --train-size, the "
                                            "reference's) or all (every confident row)")] = "validation",
    train_size: Annotated[int, typer.Option(help="the first N gen/ret rows are the training split")] = 600,
    out: Annotated[Path, typer.Option(help="result.json and result.md go here")] = Path("outputs/eval/decision"),
    batch_size: Annotated[int, typer.Option(help="prompts per LM forward while extracting features")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Retrieve-or-generate decision: macro-F1 of the checkpoint's head on PartiPrompts labels (no training)."""
    from gill.evaluation import report
    from gill.evaluation.decision import DecisionEvalSettings, evaluate_decision, load_model

    try:
        settings = DecisionEvalSettings(split=split, train_size=train_size, batch_size=batch_size)
        header = _eval_header("decision", annotations, checkpoint, device, dataset="PartiPrompts decisions")
        with console.status(f"loading {checkpoint}"):
            model = load_model(checkpoint, device)
        body = evaluate_decision(model, annotations, settings, progress=not quiet)
    except (GillError, OSError) as error:
        fail(error)
    result = header | body
    json_path, markdown_path = report.write(out, result, report.decision_markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")


@eval_app.command("clip-parity")
def eval_clip_parity(
    clip: Annotated[Path, typer.Option(help="local copy of openai/clip-vit-large-patch14 (the HF CLIPModel "
                                            "directory the evals score with)")],
    images: Annotated[Path | None, typer.Option(help="a folder of images, paired in name order (default: a "
                                                     "built-in fixture of synthetic images, several aspect ratios)")]
    = None,
    out: Annotated[Path, typer.Option(help="result.json and result.md go here")] = Path("outputs/eval/clip-parity"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cpu; both sides run fp32)")] = None,
) -> None:
    """HF transformers CLIP vs open_clip (the HF weights converted): same-pixel features and pair similarities."""
    from importlib.metadata import version

    from gill.evaluation import clip_parity, report
    from gill.evaluation.metrics import ClipSimilarity

    try:
        scorer = ClipSimilarity.from_directory(clip, device="cpu")
        visual, config = clip_parity.convert(scorer.model)
        unreadable: list[str] = []
        if images is None:
            pictures = clip_parity.fixture_images()
        else:
            pictures, unreadable = clip_parity.folder_images(images)
        body = clip_parity.compare(scorer.model, scorer.processor, visual, pictures, device or "cpu")
    except (GillError, OSError) as error:
        fail(error)
    notes = [f"unreadable images skipped: {', '.join(unreadable)}"] if unreadable else []
    result = {"eval": "clip-parity", "clip": scorer.describe(), "images_path": str(images.resolve()) if images else
              "built-in fixture (gill.evaluation.clip_parity.fixture_images)", "open_clip_config": config,
              "open_clip_registered": clip_parity.registered_configs(config),
              "versions": report.versions() | {"open_clip_torch": version("open_clip_torch")},
              "device": device or "cpu", **report.started(), **body, "notes": notes}
    json_path, markdown_path = report.write(out, result, clip_parity.markdown(result))
    print(markdown_path.read_text())
    print(f"wrote {json_path} and {markdown_path}")
