"""Result files of an eval: ``result.json`` (every setting, the checkpoint's identity, tool versions, counts,
seed) and ``result.md`` (our numbers beside the paper's), written side by side in the output directory."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The paper's numbers (Koh et al. 2023), with where each was checked; see docs/evaluation.md.
# "third-party": restated by another paper or README; "unverified": not yet checked against the PDF.
PAPER = {
    "vist": {  # Table 1, GILL rows: CLIP image-image similarity (higher better), LPIPS (lower better)
        "caption": {"clip_similarity": 0.581, "lpips": 0.702, "source": "unverified"},
        "captions": {"clip_similarity": 0.612, "lpips": 0.696, "source": "unverified"},
        "captions-images": {"clip_similarity": 0.641, "lpips": 0.693,
                            "source": "CLIP similarity third-party (MGCC, arXiv 2405.18304); LPIPS unverified"},
    },
    "vist_retrieval": {  # Table 5, 5 captions + 4 images, recall@k in percent
        "captions-images": {"r@1": 20.3, "r@5": 45.0, "r@10": 53.7,
                            "source": "third-party (reprint of the paper's Table 5)"},
    },
    "visdial": {  # Table 2, GILL row, by rounds of dialogue fed: CLIP image-image similarity, LPIPS
        "1": {"clip_similarity": 0.528, "lpips": 0.742, "source": "unverified"},
        "5": {"clip_similarity": 0.621, "lpips": 0.718, "source": "unverified"},
        "10": {"clip_similarity": 0.645, "lpips": 0.714, "source": "unverified"},
    },
    "fid": {  # MS-COCO zero-shot FID, 30K val2014 captions (the paper does not say which FID tool or mode)
        "coco-30k": {"fid": 12.2, "source": "third-party (LaVIT README table)"},
    },
    "decision": {  # not a table of the paper: the reference's notebook, validation split (600 train / 311 val)
        "validation_macro_f1": 0.54, "human_macro_f1": 0.851,
        "source": "the reference's TrainDecisionClassifier.ipynb (kohjingyu/gill): validation macro-F1 'about 0.54' "
                  "of its head, against a human-agreement line of 0.851; read from the code, not a rerun",
    },
}

_PACKAGES = ("torch", "torchvision", "transformers", "diffusers", "lpips", "clean-fid", "numpy", "pillow",
             "gill")


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{package: package_version(package) for package in _PACKAGES}}


def checkpoint_identity(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's path and fingerprint: the sha256 of its ``SHA256SUMS`` (one value that changes when any
    file changes) and of the adapters file as listed there."""
    from gill.integrity import CHECKSUMS_FILE, read_checksums

    directory = Path(directory)
    sums = read_checksums(directory)
    identity: dict[str, Any] = {"path": str(directory.resolve()), "sha256sums_sha256": None, "adapters_sha256": None}
    if sums is not None:
        identity["sha256sums_sha256"] = hashlib.sha256((directory / CHECKSUMS_FILE).read_bytes()).hexdigest()
        identity["adapters_sha256"] = sums.get("gill_adapters.safetensors")
        identity["files"] = len(sums)
    return identity


def model_line(result: dict[str, Any]) -> str:
    """Which model produced the result, for ``result.md``: the checkpoint (path and ``SHA256SUMS`` hash) of an
    in-process run, or the server (``served``: URL, Triton version, its checkpoint parameter) of a ``--url`` run."""
    served = result.get("served")
    if served is None:
        checkpoint = result["checkpoint"]
        return (f"Checkpoint `{checkpoint['path']}` (SHA256SUMS sha256 "
                f"`{str(checkpoint['sha256sums_sha256'])[:16]}`)")
    server = served.get("server")
    about = (f"Triton {server['version']}, model `{served['model']}` versions {', '.join(server['model_versions'])}, "
             f"server-side checkpoint `{server['checkpoint']}`" if server else
             f"server metadata not available: {served.get('server_error')}")
    return f"Served by `{served['url']}` through gill_client ({about})"


def summary(values: list[float]) -> dict[str, float | int | None]:
    """Mean, standard deviation and standard error of per-example values (None when empty)."""
    if not values:
        return {"mean": None, "std": None, "sem": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "sem": std / np.sqrt(len(array)), "n": len(array)}


def started() -> dict[str, Any]:
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


def write(out: str | Path, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / "result.json", out / "result.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    markdown_path.write_text(markdown)
    return json_path, markdown_path


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def vist_markdown(result: dict[str, Any]) -> str:
    """The VIST generation table: ours beside the paper's GILL row, per context setting."""
    from gill.evaluation.vist import CONTEXTS

    lines = [f"# VIST contextual image generation ({result['dataset']['path']})", "",
             f"{model_line(result)}, seed {result['settings']['seed']}, "
             f"{result['settings']['num_inference_steps']} {result['settings']['scheduler']} steps, guidance "
             f"{result['settings']['guidance_scale']}.", "",
             "| context | CLIP similarity (ours) | paper | LPIPS (ours) | paper | stories scored |",
             "|---|---|---|---|---|---|"]
    for context, row in result["results"].items():
        paper = PAPER["vist"].get(context, {})
        lpips_mean = row["lpips"]["mean"] if row.get("lpips") else None
        lines.append(f"| {CONTEXTS[context]} | {_number(row['clip_similarity']['mean'])} | "
                     f"{_number(paper.get('clip_similarity'))} | {_number(lpips_mean)} | {_number(paper.get('lpips'))} "
                     f"| {row['scored']} |")
    counts = result["counts"]
    lines += ["", f"Stories: {counts['stories']} in the split, {counts['evaluated']} evaluated, "
                  f"{counts['skipped_missing_images']} skipped for missing or unreadable images "
                  f"({counts['images_missing']} missing, {counts['images_unreadable']} unreadable)."]
    notes = result.get("notes") or []
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines += ["", "Paper numbers: " + "; ".join(f"{CONTEXTS[c]}: {p['source']}" for c, p in PAPER["vist"].items()), ""]
    return "\n".join(lines)


def retrieval_markdown(result: dict[str, Any]) -> str:
    from gill.evaluation.vist import CONTEXTS

    lines = [f"# VIST contextual image retrieval ({result['dataset']['path']})", "",
             f"Checkpoint `{result['checkpoint']['path']}`; {result['counts']['candidates']} candidate images.", "",
             "| context | R@1 (ours) | paper | R@5 (ours) | paper | R@10 (ours) | paper | stories |",
             "|---|---|---|---|---|---|---|---|"]
    for context, row in result["results"].items():
        paper = PAPER["vist_retrieval"].get(context, {})
        cells = []
        for k in (1, 5, 10):
            cells += [_number(row["recall"].get(f"r@{k}"), 1), _number(paper.get(f"r@{k}"), 1)]
        lines.append(f"| {CONTEXTS[context]} | " + " | ".join(cells) + f" | {row['queries']} |")
    counts = result["counts"]
    lines += ["", "Recall in percent. " f"Stories: {counts['stories']} in the split, {counts['evaluated']} evaluated, "
                  f"{counts['skipped_missing_images']} skipped for missing or unreadable images.", ""]
    return "\n".join(lines)


def decision_markdown(result: dict[str, Any]) -> str:
    """The decision head's macro-F1 beside the majority-class baseline and the reference notebook's numbers."""
    settings, counts, results = result["settings"], result["counts"], result["results"]
    paper = PAPER["decision"]
    split = (f"validation split (confident rows after the first {settings['train_size']})"
             if settings["split"] == "validation" else "all confident rows")
    on_reference_split = settings["split"] == "validation" and settings["train_size"] == 600
    reference = _number(paper["validation_macro_f1"], 2) if on_reference_split else "n/a (other split)"
    head, baseline = results["head"], results["baseline"]
    lines = [f"# Retrieve-or-generate decision ({result['dataset']['path']})", "",
             f"Checkpoint `{result['checkpoint']['path']}` (SHA256SUMS sha256 "
             f"`{str(result['checkpoint']['sha256sums_sha256'])[:16]}`, decision head sha256 "
             f"`{str(result['decision_head'].get('sha256'))[:16]}`), {split}.", "",
             "| | macro-F1 | accuracy |", "|---|---|---|",
             f"| this checkpoint's head | {_number(head['macro_f1'])} | {_number(head['accuracy'])} |",
             f"| always {results['majority']} (baseline) | {_number(baseline['macro_f1'])} | "
             f"{_number(baseline['accuracy'])} |",
             f"| reference notebook's head | {reference} | n/a |",
             f"| human agreement (reference notebook) | {_number(paper['human_macro_f1'])} | n/a |", "",
             f"Rows: {counts['annotated']} annotated, {counts['dropped_same']} 'same' dropped, {counts['evaluated']} "
             f"scored (labels gen {counts['labels']['gen']} / ret {counts['labels']['ret']}; predicted gen "
             f"{counts['predicted']['gen']} / ret {counts['predicted']['ret']}).", "",
             f"Reference numbers: {paper['source']}.", ""]
    return "\n".join(lines)


def visdial_markdown(result: dict[str, Any]) -> str:
    """The VisDial generation table: ours beside the paper's GILL row, per round count."""
    settings, counts = result["settings"], result["counts"]
    caption = "caption line first (a variant, not the paper's prompt)" if settings["include_caption"] else \
        "no caption (the reference's prompt)"
    lines = [f"# VisDial contextual image generation ({result['dataset']['path']})", "",
             f"{model_line(result)}, seed {settings['seed']}, "
             f"{settings['num_inference_steps']} {settings['scheduler']} steps, guidance {settings['guidance_scale']}; "
             f"text only, {caption}.", "",
             "| rounds | CLIP similarity (ours) | paper | LPIPS (ours) | paper | dialogs scored |",
             "|---|---|---|---|---|---|"]
    for rounds, row in result["results"].items():
        paper = PAPER["visdial"].get(rounds, {}) if not settings["include_caption"] else {}
        lpips_mean = row["lpips"]["mean"] if row.get("lpips") else None
        lines.append(f"| {rounds} | {_number(row['clip_similarity']['mean'])} | "
                     f"{_number(paper.get('clip_similarity'))} | {_number(lpips_mean)} | {_number(paper.get('lpips'))} "
                     f"| {row['scored']} |")
    lines += ["", f"Dialogs: {counts['dialogs']} in the file, {counts['evaluated']} evaluated, "
                  f"{counts['skipped_too_few_rounds']} skipped for too few rounds, {counts['skipped_missing_images']} "
                  f"for a missing or unreadable image ({counts['images_missing']} missing, "
                  f"{counts['images_unreadable']} unreadable)."]
    notes = result.get("notes") or []
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines += ["", "Paper numbers (Table 2, GILL): " + "; ".join(f"{k} rounds: {p['source']}"
                                                              for k, p in PAPER["visdial"].items()), ""]
    return "\n".join(lines)


def fid_markdown(result: dict[str, Any]) -> str:
    """FID with everything that changes it stated: tool, mode, Inception weights, reference folder, sample counts."""
    fid, settings = result["results"], result["settings"]
    reference = fid["reference"]
    generation = result.get("generation")
    source = (f"{generation['captions']} captions of `{result['dataset']['path']}` (seed {settings['seed']}, "
              f"{settings['num_inference_steps']} {settings['scheduler']} steps, guidance {settings['guidance_scale']})"
              if generation else f"the images in `{result['generated_path']}`")
    paper = PAPER["fid"]["coco-30k"]
    sizes = ", ".join(f"{size} x{count}" for size, count in fid["generated_sizes"].items())
    cached = "read from the cache" if reference["cached"] else "computed and cached"
    tool = result["fid_tool"]
    lines = [f"# FID ({result['fid_tool']['implementation']}, mode {settings['mode']})", "",
             "| | FID | generated images | reference images |", "|---|---|---|---|",
             f"| ours | {_number(fid['fid'], 2)} | {fid['generated_images']} | {reference['images']} |",
             f"| paper, MS-COCO zero-shot | {_number(paper['fid'], 1)} | 30,000 (val2014 captions) | COCO val2014 |",
             "", f"Generated from {source}; sizes {sizes}."
             + (" clean-fid resizes every image, generated and real, to 299x299 (PIL bicubic in float, no crop)."
                if settings["mode"] == "clean" else ""),
             f"Reference: `{reference['directory']}`, statistics {cached} (`{reference['stats_file']}`).",
             f"Feature extractor: {tool['implementation']}"
             + (f", `{tool['file']}` (sha256 `{str(tool.get('sha256'))[:16]}`)." if tool.get("file") else ".")]
    if generation:
        lines.append(f"{model_line(result)}.")
        lines.append(f"Captions: {generation['captions']} ({generation['generated']} generated now, "
                     f"{generation['reused']} kept from an earlier run, {generation['no_image']} without an image).")
    notes = result.get("notes") or []
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines += ["", f"Paper number: {paper['source']}; the paper does not say which FID tool, mode or reference "
                  "preprocessing it used, so compare with care.", ""]
    return "\n".join(lines)
