"""``gill download DIR``: fetch the real weights, every file sha256-checked, resumable.

What is fetched is data, not code: the manifest ``gill/data/manifest.json`` (package data, so it ships with an
installed ``gill``; no file under ``checkpoints/`` is needed) lists every file with its repository, repository
type (``model`` or ``space``), pinned revision, path in the repository, local path under DIR, optional size,
optional sha256, and ``option`` (``null``: always fetched; ``"embeddings"`` or ``"safety_checker"``: only when
asked). The layout of DIR afterwards::

    opt-6.7b/                   facebook/opt-6.7b: configs, tokenizer, safetensors shards
    clip-vit-large-patch14/     openai/clip-vit-large-patch14
    sd-v1-5/                    stable-diffusion-v1-5/stable-diffusion-v1-5, fp16 safetensors (no safety checker
                                weights unless include_safety_checker)
    pretrained_ckpt.pth.tar     GILL adapters (model repo jykoh/gill), input of ``gill convert``
    decision_model.pth.tar      retrieve-or-generate head (jykoh/gill)
    model_args.official.json    jykoh/gill's model_args.json, unchanged
    model_args.json             the same, with opt_version / visual_encoder / sd_version set to the folders above
    cc3m_embeddings_urls.npy    only with include_embeddings: retrieval embeddings (Space jykoh/gill, 2.89 GB)
    download-lock.json          the sha256 of every verified file
    SHA256SUMS                  the sha256 of every file of the checkpoint (sha256sum format; gill.integrity),
                                from the verified hashes; gill convert adds the files it writes

Integrity: a file's expected sha256 is, in order, the manifest's, the lock file's (from an earlier run), the
server's ``X-Linked-Etag`` header (the Hugging Face Hub puts the sha256 of LFS files there), or else the hash of
what arrived, recorded in the lock file ("trust on first use", with an :class:`UnverifiedDownloadWarning`) and
enforced on later runs. A mismatch deletes the partial file and raises :class:`~gill.errors.DownloadError`.

Transfer: each file goes to ``<file>.part`` and is renamed only once verified; an existing ``.part`` is resumed
with an HTTP ``Range`` request (a server that answers 200 instead of 206 makes it start over). Connection
errors, 429 and 5xx answers are retried a few times with exponential backoff. Files already present with the
expected sha256 are skipped. The source is ``{endpoint}/{repo}/resolve/{revision}/{path}`` (Spaces:
``{endpoint}/spaces/{repo}/...``), endpoint ``https://huggingface.co`` unless ``HF_ENDPOINT`` or ``endpoint=``
says otherwise, with ``Authorization: Bearer $HF_TOKEN`` when set; or ``source_dir=``, a local mirror holding
``<repo>/<path>`` (Spaces: ``spaces/<repo>/<path>``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import requests
from tqdm.auto import tqdm

from gill.config import GILLArgs
from gill.errors import CheckpointError, DownloadError, InputError
from gill.integrity import write_checksums

MANIFEST_PATH = Path(__file__).resolve().parent / "data" / "manifest.json"
# The reference's model_args.json in a source checkout; used only when the downloaded one is absent or unreadable.
_CHECKOUT_MODEL_ARGS = Path(__file__).resolve().parent.parent / "checkpoints" / "gill_opt" / "model_args.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
LOCK_FILE = "download-lock.json"
OPTIONS = ("embeddings", "safety_checker")
REPO_TYPES = ("model", "space")
TIMEOUT_S = (10.0, 60.0)  # (connect, read)
ATTEMPTS = 4  # per file, on connection errors, 429 and 5xx
BACKOFF_S = 2.0  # wait before the second attempt; doubles after each
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UnverifiedDownloadWarning(UserWarning):
    """A file had no known sha256: the hash of what arrived was recorded in the lock file (trust on first use)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file to fetch: ``path`` at ``revision`` of ``repo`` goes to ``local_path`` under the target directory."""

    repo: str
    path: str
    local_path: str
    repo_type: str = "model"
    revision: str = "main"
    sha256: str | None = None
    size: int | None = None
    option: str | None = None


@dataclass(frozen=True)
class ModelArgsSpec:
    """How to write ``model_args.json``: start from ``source`` (a local path) and set each field to a folder."""

    source: str
    folders: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestEntry, ...]
    model_args: ModelArgsSpec | None = None


def _relative(value: Any, what: str) -> str:
    """A relative POSIX path that stays inside the target directory."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError(f"{what} must be a relative path inside the download directory, got {value!r}")
    return value


def _parse_entry(data: Any) -> ManifestEntry:
    if not isinstance(data, dict):
        raise TypeError("expected an object")
    known = {f.name for f in dataclasses.fields(ManifestEntry)}
    if set(data) - known:
        raise ValueError(f"unknown fields {sorted(set(data) - known)}; allowed: {sorted(known)}")
    entry = ManifestEntry(**data)
    for name in ("repo", "revision"):
        if not isinstance(getattr(entry, name), str) or not getattr(entry, name):
            raise ValueError(f"{name} must be a non-empty string")
    _relative(entry.path, "path")
    _relative(entry.local_path, "local_path")
    if entry.repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {entry.repo_type!r}")
    if entry.sha256 is not None and not (isinstance(entry.sha256, str) and _SHA256.fullmatch(entry.sha256)):
        raise ValueError(f"sha256 must be null or 64 lowercase hex digits, got {entry.sha256!r}")
    if entry.size is not None and (not isinstance(entry.size, int) or entry.size < 0):
        raise ValueError(f"size must be null or a non-negative integer, got {entry.size!r}")
    if entry.option is not None and entry.option not in OPTIONS:
        raise ValueError(f"option must be null or one of {OPTIONS}, got {entry.option!r}")
    return entry


def _parse_model_args(data: Any) -> ModelArgsSpec:
    if not isinstance(data, dict) or set(data) != {"source", "folders"} or not isinstance(data["folders"], dict):
        raise ValueError('expected {"source": local path, "folders": {field: folder}}')
    fields = {f.name for f in dataclasses.fields(GILLArgs)}
    for name, folder in data["folders"].items():
        if name not in fields:
            raise ValueError(f"unknown GILLArgs field {name!r}")
        _relative(folder, f"folders.{name}")
    return ModelArgsSpec(_relative(data["source"], "source"), tuple(data["folders"].items()))


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate a manifest; the default is the one shipped with the package (``gill/data/manifest.json``)."""
    path = Path(path) if path is not None else MANIFEST_PATH
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DownloadError(f"manifest {path}: cannot read it ({error})") from error
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("files"), list):
        raise DownloadError(f'manifest {path}: expected an object with "format": 1 and a "files" list')
    files = []
    for index, item in enumerate(data["files"]):
        try:
            files.append(_parse_entry(item))
        except (TypeError, ValueError) as error:
            raise DownloadError(f"manifest {path}: files[{index}]: {error}") from error
    duplicates = sorted({e.local_path for e in files if [f.local_path for f in files].count(e.local_path) > 1})
    if duplicates:
        raise DownloadError(f"manifest {path}: local paths listed twice: {duplicates}")
    model_args = None
    if data.get("model_args") is not None:
        try:
            model_args = _parse_model_args(data["model_args"])
        except ValueError as error:
            raise DownloadError(f"manifest {path}: model_args: {error}") from error
    return Manifest(tuple(files), model_args)


# ---- the lock file: the sha256 of every file verified so far, keyed by local path ----

def _read_lock(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / LOCK_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DownloadError(f"{path}: unreadable lock file ({error}); delete it to re-verify from scratch") from error
    return files


def _write_lock(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    path = directory / LOCK_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=2) + "\n")
    os.replace(tmp, path)


def _locked_sha256(lock: dict[str, dict[str, Any]], entry: ManifestEntry) -> str | None:
    """The sha256 recorded for this entry, if the record is for the same repository file."""
    record = lock.get(entry.local_path)
    if not isinstance(record, dict):
        return None
    same = all(record.get(k) == getattr(entry, k) for k in ("repo", "repo_type", "revision", "path"))
    sha = record.get("sha256")
    return sha if same and isinstance(sha, str) and _SHA256.fullmatch(sha) else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- sources: they write an entry's bytes to a .part file and report what they learned ----

@dataclass(frozen=True)
class _Fetched:
    sha256: str  # of the whole .part file
    header_sha256: str | None = None  # the server's X-Linked-Etag, when it is a sha256
    commit: str | None = None  # the server's X-Repo-Commit


class _Retry(Exception):
    """A transient failure (connection error, 429, 5xx); the next attempt resumes the .part file."""


def hub_url(entry: ManifestEntry, endpoint: str = DEFAULT_ENDPOINT) -> str:
    """The URL an entry is fetched from: ``{endpoint}[/spaces]/{repo}/resolve/{revision}/{path}``."""
    prefix = "spaces/" if entry.repo_type == "space" else ""
    revision = quote(entry.revision, safe="")
    return f"{endpoint.rstrip('/')}/{prefix}{entry.repo}/resolve/{revision}/{quote(entry.path, safe='/')}"


def _etag_sha256(response: requests.Response) -> str | None:
    for r in (*response.history, response):
        value = r.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(value):
            return value
    return None


class _HttpSource:
    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.session = requests.Session()
        # Identity encoding keeps byte ranges and lengths those of the file itself.
        self.session.headers["Accept-Encoding"] = "identity"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def describe(self, entry: ManifestEntry) -> str:
        return hub_url(entry, self.endpoint)

    def remote_sha256(self, entry: ManifestEntry) -> str | None:
        """The server's sha256 for the file, from a HEAD request; None when it gives none or is unreachable."""
        try:
            response = self.session.head(self.describe(entry), allow_redirects=False, timeout=TIMEOUT_S)
        except requests.RequestException:
            return None
        return _etag_sha256(response)

    def fetch(self, entry: ManifestEntry, part: Path, bar: tqdm) -> _Fetched:
        url = self.describe(entry)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._attempt(entry, url, part, bar)
            except (_Retry, requests.ConnectionError, requests.Timeout) as error:
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f"{entry.local_path}: {url}: {error}; gave up after {ATTEMPTS} attempts. Check the network "
                        f"(or HF_ENDPOINT) and run the download again: it resumes from {part.name}") from error
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _attempt(self, entry: ManifestEntry, url: str, part: Path, bar: tqdm) -> _Fetched:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.session.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code == 416 and offset:  # the .part is not a prefix of this file: start over
                part.unlink()
                raise _Retry(f"{url} refused to resume; restarting")
            _check_status(response, entry, url)
            if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {offset}-"):
                part.unlink()
                raise _Retry(f"{url} answered an unexpected range; restarting")
            if response.status_code != 206:
                offset = 0  # the server sent the whole file (it ignored Range)
            digest = hashlib.sha256()
            if offset:
                with part.open("rb") as done:
                    while chunk := done.read(_CHUNK):
                        digest.update(chunk)
            length = response.headers.get("Content-Length")
            bar.reset(total=offset + int(length) if length and length.isdigit() else entry.size)
            bar.update(offset)
            try:
                with part.open("ab" if offset else "wb") as out:
                    for chunk in response.iter_content(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            except requests.exceptions.ChunkedEncodingError as error:
                raise _Retry(str(error)) from error
            commit = next((r.headers["X-Repo-Commit"] for r in (*response.history, response)
                           if "X-Repo-Commit" in r.headers), None)
            return _Fetched(digest.hexdigest(), _etag_sha256(response), commit)


def _check_status(response: requests.Response, entry: ManifestEntry, url: str) -> None:
    code = response.status_code
    if code in (200, 206):
        return
    if code == 429 or code >= 500:
        raise _Retry(f"HTTP {code}")
    if code in (401, 403):
        raise DownloadError(
            f"{entry.local_path}: {url}: HTTP {code} (access denied); set HF_TOKEN to a Hugging Face token that can "
            f"read {entry.repo} (and accept its terms on the website if it is gated)")
    if code == 404:
        raise DownloadError(
            f"{entry.local_path}: {url}: HTTP 404 (not found); the manifest entry (repo {entry.repo}, revision "
            f"{entry.revision}, path {entry.path}) may be out of date: fix it in {MANIFEST_PATH} or pass manifest=")
    raise DownloadError(f"{entry.local_path}: {url}: unexpected HTTP {code}")


class _DirSource:
    """A local mirror of the hub: ``<repo>/<path>``, and ``spaces/<repo>/<path>`` for Spaces."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise InputError(f"source_dir {root}: not a directory; it should hold <repo_id>/<path in repo>")
        self.root = root

    def close(self) -> None:
        pass

    def describe(self, entry: ManifestEntry) -> str:
        prefix = ("spaces",) if entry.repo_type == "space" else ()
        return str(self.root.joinpath(*prefix, *entry.repo.split("/"), *PurePosixPath(entry.path).parts))

    def remote_sha256(self, entry: ManifestEntry) -> str | None:
        return None

    def fetch(self, entry: ManifestEntry, part: Path, bar: tqdm) -> _Fetched:
        source = Path(self.describe(entry))
        if not source.is_file():
            raise DownloadError(
                f"{entry.local_path}: {source} not found; the source directory should mirror the hub as "
                "<repo_id>/<path> (spaces/<repo_id>/<path> for Spaces)")
        digest = hashlib.sha256()
        bar.reset(total=source.stat().st_size)
        with source.open("rb") as src, part.open("wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        return _Fetched(digest.hexdigest())


# ---- the download itself ----

def _fetch_one(entry: ManifestEntry, directory: Path, source: _HttpSource | _DirSource,
               lock: dict[str, dict[str, Any]], desc: str, quiet: bool) -> str:
    """Make ``directory/entry.local_path`` hold the verified file; says how: present, fetched or first-use."""
    final = directory / entry.local_path
    known = entry.sha256 or _locked_sha256(lock, entry)
    if final.is_file():
        expected = known or source.remote_sha256(entry)
        if expected is not None and _sha256_file(final) == expected:
            if not quiet:
                tqdm.write(f"{desc}: present, sha256 ok")
            how = "manifest" if entry.sha256 else "lock" if known else "x-linked-etag"
            _record(lock, directory, entry, expected, how, None)
            return "present"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    with tqdm(desc=desc, total=entry.size, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet) as bar:
        fetched = source.fetch(entry, part, bar)
    expected, how = ((entry.sha256, "manifest") if entry.sha256 else (known, "lock") if known
                     else (fetched.header_sha256, "x-linked-etag"))
    actual_size = part.stat().st_size
    if expected is not None and fetched.sha256 != expected or entry.size is not None and actual_size != entry.size:
        part.unlink()
        raise DownloadError(
            f"{entry.local_path}: content check failed for {source.describe(entry)}: expected sha256 {expected} "
            f"(from the {how}){f' and {entry.size} bytes' if entry.size is not None else ''}, got sha256 "
            f"{fetched.sha256} and {actual_size} bytes. The partial file was deleted. Run again to retry; if the "
            f"upstream file changed on purpose, update the manifest or remove its record from {LOCK_FILE}")
    if expected is None:
        expected, how = fetched.sha256, "first-use"
    os.replace(part, final)
    _record(lock, directory, entry, expected, how, fetched.commit)
    return "first-use" if how == "first-use" else "fetched"


def _record(lock: dict[str, dict[str, Any]], directory: Path, entry: ManifestEntry, sha256: str, how: str,
            commit: str | None) -> None:
    old = lock.get(entry.local_path, {})
    record = {"repo": entry.repo, "repo_type": entry.repo_type, "revision": entry.revision, "path": entry.path,
              "sha256": sha256, "verified_by": old.get("verified_by", how) if how == "lock" else how}
    if commit or old.get("commit"):
        record["commit"] = commit or old.get("commit")
    if record != old:
        lock[entry.local_path] = record
        _write_lock(directory, lock)


def write_model_args(directory: str | Path, spec: ModelArgsSpec) -> Path:
    """Write ``directory/model_args.json``: the downloaded official args with base models set to local folders.

    The start is ``directory/spec.source``; when that is absent or unreadable, the reference's file in a source
    checkout, else the paper's defaults (:class:`GILLArgs`).
    """
    directory = Path(directory)
    base = GILLArgs()
    for candidate in (directory / spec.source, _CHECKOUT_MODEL_ARGS):
        if candidate.is_file():
            try:
                base = GILLArgs.load(candidate)
                break
            except CheckpointError as error:
                warnings.warn(f"{error}; trying the next source for model_args.json", stacklevel=2)
    return dataclasses.replace(base, **dict(spec.folders)).save(directory)


def selected_entries(manifest: Manifest, *, include_embeddings: bool = False,
                     include_safety_checker: bool = False) -> list[ManifestEntry]:
    """The manifest's files that these options ask for."""
    on = {"embeddings": include_embeddings, "safety_checker": include_safety_checker}
    return [e for e in manifest.files if e.option is None or on[e.option]]


def download(directory: str | Path, *, manifest: Manifest | str | Path | None = None, endpoint: str | None = None,
             source_dir: str | Path | None = None, include_embeddings: bool = False,
             include_safety_checker: bool = False, quiet: bool = False) -> list[Path]:
    """Fetch the manifest's files into ``directory`` and write its ``model_args.json``; returns their paths.

    ``manifest``: a :class:`Manifest` or a manifest file (default: the packaged one). ``endpoint``: the hub's base
    URL (default ``$HF_ENDPOINT``, else ``https://huggingface.co``). ``source_dir``: copy from a local mirror
    instead of HTTP. ``quiet``: no progress output (warnings still show). Raises :class:`DownloadError`.
    """
    if endpoint is not None and source_dir is not None:
        raise InputError("pass either endpoint= (HTTP) or source_dir= (a local mirror), not both")
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = selected_entries(manifest, include_embeddings=include_embeddings,
                               include_safety_checker=include_safety_checker)
    if source_dir is not None:
        source: _HttpSource | _DirSource = _DirSource(Path(source_dir))
    else:
        source = _HttpSource(endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
                             os.environ.get("HF_TOKEN"))
    lock = _read_lock(directory)
    outcomes: dict[str, list[str]] = {"present": [], "fetched": [], "first-use": []}
    try:
        for index, entry in enumerate(entries, 1):
            outcome = _fetch_one(entry, directory, source, lock, f"[{index}/{len(entries)}] {entry.local_path}", quiet)
            outcomes[outcome].append(entry.local_path)
    finally:
        source.close()
        if outcomes["first-use"]:
            warnings.warn(UnverifiedDownloadWarning(
                f"no sha256 was known for {len(outcomes['first-use'])} file(s) (not in the manifest, none from the "
                f"server): {', '.join(outcomes['first-use'])}; their hashes are now recorded in "
                f"{directory / LOCK_FILE} and later runs verify against them"), stacklevel=2)
    paths = [directory / e.local_path for e in entries]
    if manifest.model_args is not None:
        paths.append(write_model_args(directory, manifest.model_args))
    write_checksums(directory, known={e.local_path: lock[e.local_path]["sha256"] for e in entries},
                    progress=False if quiet else None)
    if not quiet:
        tqdm.write(f"gill download: {len(entries)} files verified in {directory} "
                   f"({len(entries) - len(outcomes['present'])} fetched, {len(outcomes['present'])} already present)")
    return paths

