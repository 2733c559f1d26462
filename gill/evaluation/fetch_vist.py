"""``gill eval fetch-vist``: download the photos a VIST SIS split refers to, as the eval commands read them.

As the reference's ``evals/download_vist_images.py``: each photo comes from its Flickr ``url_o`` and is squashed to
224x224 (no aspect ratio kept, :func:`~gill.evaluation.datasets.squash`) and saved as ``<out>/<photo id>.png``, the
layout :class:`~gill.evaluation.datasets.ImageFolder` reads. Unlike the reference (no timeout, no size limit, one
photo at a time, a dead URL stops the run):

- every URL goes through :class:`gill.fetch.ImageFetcher`: ``http``/``https`` only, private and loopback addresses
  refused (unless ``allow_private``), a wall-clock timeout per URL, a byte limit, ``image/*`` answers only;
- a photo whose entry has no ``url_o``, or whose ``url_o`` fails, is tried at the other sizes its entry lists
  (:data:`~gill.evaluation.datasets.URL_FIELDS`, best first);
- failures that may pass (a timeout, a dropped connection, HTTP 429 or 5xx) are retried ``retries`` times with
  exponential backoff; the others (404, too large, not an image, a blocked address) are not;
- resumable: photos already in ``out`` (any extension :class:`ImageFolder` reads) are skipped; a photo is written
  to ``<id>.png.part`` and renamed only once complete, so an interrupted run never leaves a partial file under a
  name the evals read;
- photos that could not be fetched are counted and listed with their reason in ``<out>/missing.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gill.errors import InputError
from gill.evaluation.datasets import IMAGE_EXTENSIONS, SQUASH_SIZE, VistSplit, squash

MISSING_FILE = "missing.json"
PART_SUFFIX = ".part"
# Flickr photo ids are digits; anything else that could escape the folder or hide a file is refused.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# FetchError reasons worth another try (gill.fetch words them this way); the others will not change.
_TRANSIENT = re.compile(r"^(timed out|connection failed|transfer failed|HTTP (429|5\d\d))")


@dataclass(frozen=True)
class FetchSettings:
    """Limits of one run; checked on construction (:class:`~gill.errors.InputError`)."""

    workers: int = 8  # photos fetched at once
    timeout_s: float = 30.0  # wall-clock bound of one URL (connect, every read, redirects)
    retries: int = 2  # further tries of a photo after a failure that may pass
    backoff_s: float = 1.0  # wait before the first retry; doubles after each
    max_bytes: int = 32 * 1024 * 1024  # larger answers are refused (Flickr originals are rarely above 20 MB)
    size: int = SQUASH_SIZE  # squash to size x size as the reference; 0 keeps the original pixels
    max_photos: int | None = None  # only the first N photos of the split (in first-use order)
    allow_private: bool = False  # also fetch from private and loopback addresses (a mirror on your network)

    def __post_init__(self) -> None:
        for name, minimum in (("workers", 1), ("retries", 0), ("max_bytes", 1), ("size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name}={value!r}: give an integer >= {minimum}")
        for name, allowed in (("timeout_s", "> 0"), ("backoff_s", ">= 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "timeout_s" and value == 0):
                raise InputError(f"{name}={value!r}: give a finite number of seconds {allowed}")
        if self.max_photos is not None and (not isinstance(self.max_photos, int) or self.max_photos < 1):
            raise InputError(f"max_photos={self.max_photos!r}: give at least 1, or None for all")


@dataclass
class FetchSummary:
    """What one run did. ``present``: already in the folder (skipped); ``fetched``: written by this run;
    ``failed``: no image (each listed in ``missing.json``), of which ``no_url`` had no URL in the split."""

    photos: int = 0
    present: int = 0
    fetched: int = 0
    failed: int = 0
    no_url: int = 0
    retried: int = 0  # extra tries made after failures that may pass
    fallback_urls: int = 0  # photos fetched from a URL other than their first (e.g. url_m when url_o is dead)
    missing: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        return {key: value for key, value in asdict(self).items() if key != "missing"}


def existing_photo(out: Path, image_id: str) -> Path | None:
    """The photo's file in ``out`` under a name the evals read, or None (``.part`` files never count)."""
    for extension in IMAGE_EXTENSIONS:
        candidate = out / f"{image_id}{extension}"
        if candidate.is_file():
            return candidate
    return None


def _fetch_photo(fetcher, image_id: str, urls: tuple[str, ...], out: Path, settings: FetchSettings,
                 stop: threading.Event) -> dict[str, Any]:
    """Fetch, decode, squash and write one photo; returns ``{"ok": bool, "reason": ..., "url": ..., "tries": n}``."""
    from gill.images import load_image

    result, tries = None, 0
    for attempt in range(settings.retries + 1):
        tries += 1
        failures: list[tuple[str, str]] = []
        result = fetcher.first(urls, failures)
        if result is not None:
            break
        reason = "; ".join(f"{url}: {why}" for url, why in failures)
        if attempt == settings.retries or stop.is_set() or not any(_TRANSIENT.match(why) for _, why in failures):
            return {"ok": False, "reason": reason, "tries": tries}
        if stop.wait(settings.backoff_s * 2 ** attempt):
            return {"ok": False, "reason": reason, "tries": tries}
    assert result is not None
    try:
        image = load_image(result.data, what=result.url)
    except InputError as error:
        return {"ok": False, "reason": f"{result.url}: not a decodable image ({error})", "tries": tries}
    if settings.size:
        image = squash(image, settings.size)
    final = out / f"{image_id}.png"
    part = out / f"{image_id}.png{PART_SUFFIX}"
    try:
        image.save(part, format="PNG")
        os.replace(part, final)  # atomic on one file system: the evals see the whole photo or none
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return {"ok": True, "url": result.url, "fallback": result.index > 0, "tries": tries}


def fetch_vist_photos(split: VistSplit, out: str | Path, settings: FetchSettings = FetchSettings(),
                      progress: bool = True) -> FetchSummary:
    """Download the photos of ``split`` into ``out`` (see the module docstring); writes ``out/missing.json``.

    Never raises for a photo that cannot be fetched: it is counted in :attr:`FetchSummary.failed` and listed.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from tqdm import tqdm

    from gill.fetch import FetchPolicy, ImageFetcher

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = split.image_ids
    if settings.max_photos is not None:
        ids = ids[:settings.max_photos]
    summary = FetchSummary(photos=len(ids))
    failed: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, tuple[str, ...]]] = []
    for image_id in ids:
        urls = split.image_url_options.get(image_id) or ((split.image_urls[image_id],)
                                                         if image_id in split.image_urls else ())
        if not _SAFE_ID.fullmatch(image_id):
            failed[image_id] = {"id": image_id, "reason": "photo id is not a safe file name", "urls": list(urls)}
        elif existing_photo(out, image_id) is not None:
            summary.present += 1
        elif not urls:
            summary.no_url += 1
            failed[image_id] = {"id": image_id, "reason": "no URL in the split (url_o, url_m ...)", "urls": []}
        else:
            todo.append((image_id, urls))

    # Photos are fetched by this pool, one URL at a time each (concurrency 1: url_m only after url_o failed);
    # the session's connection pool is as large as the pool of workers.
    policy = FetchPolicy(timeout_s=float(settings.timeout_s), max_bytes=settings.max_bytes,
                         allow_private=settings.allow_private, concurrency=1, cache_bytes=0)
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=max(10, settings.workers))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    stop = threading.Event()
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="VIST photos", unit="photo",
               disable=not progress)
    bar.set_postfix(fetched=0, failed=len(failed))
    try:
        with ImageFetcher(policy, session) as fetcher, ThreadPoolExecutor(settings.workers) as pool:
            futures = {pool.submit(_fetch_photo, fetcher, image_id, urls, out, settings, stop): (image_id, urls)
                       for image_id, urls in todo}
            try:
                for future in as_completed(futures):
                    image_id, urls = futures[future]
                    outcome = future.result()
                    summary.retried += outcome["tries"] - 1
                    if outcome["ok"]:
                        summary.fetched += 1
                        summary.fallback_urls += int(outcome["fallback"])
                    else:
                        failed[image_id] = {"id": image_id, "reason": outcome["reason"], "urls": list(urls)}
                    bar.update(1)
                    bar.set_postfix(fetched=summary.fetched, failed=len(failed))
            except BaseException:  # Ctrl-C: let running photos finish their current URL, start no new ones
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
        session.close()
    summary.failed = len(failed)
    order = {image_id: index for index, image_id in enumerate(ids)}
    summary.missing = sorted(failed.values(), key=lambda entry: order[entry["id"]])
    (out / MISSING_FILE).write_text(json.dumps({
        "split": str(split.path), "photos": summary.photos, "failed": summary.failed,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "missing": summary.missing}, indent=1) + "\n")
    return summary
