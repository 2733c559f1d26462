"""Checkpoint integrity: ``SHA256SUMS`` lists every file of a checkpoint directory with its sha256, and
:func:`verify_checkpoint` refuses a directory whose files are missing, changed or mis-shaped, naming the file.

``SHA256SUMS`` is in ``sha256sum`` format, so ``cd DIR && sha256sum -c SHA256SUMS`` checks it too::

    5c1e...9a  gill_adapters.safetensors
    0f3b...d2  lm/model.safetensors

It lists every file under the directory except bookkeeping and files that change while a checkpoint is in use
(see :func:`checkpoint_files`). Who writes it: ``gill make-tiny`` (hashes everything), ``gill download`` (from
the hashes it verified while fetching, so nothing is hashed twice) and ``gill convert`` (adds the files it
wrote). After a deliberate change, ``gill verify DIR --record`` records the directory as it is.

Who checks it: :meth:`TritonServer.start <gill.serving.server.TritonServer.start>` before tritonserver is
launched (so ``gill serve`` and ``gill run --served``) and :meth:`Pipeline.from_checkpoint
<gill.pipeline.Pipeline.from_checkpoint>`. A Triton started some other way (NVIDIA's image in Kubernetes)
checks nothing by itself: run ``gill verify DIR`` before it, for example in an init container.

Restarts: the real checkpoint is about 20 GB, minutes of hashing, so a hashed file gets a record of its sha256
and ``(size, mtime_ns, ctime_ns, inode, device)`` in ``.sha256-verified.json``, and a later check takes the
sha256 from the record while the file's identity still matches it. Every write through the file system changes mtime and
ctime (and ctime cannot be set back), so an edited, replaced, copied or re-downloaded file is hashed again.
What a record cannot see is corruption below the file system (bit rot): ``gill verify DIR`` hashes everything.
File timestamps are coarse, so a file changed less than ``_RACY_NS`` before its hashing began gets no record
(git's "racy clean" rule). Records are best effort: in a read-only directory there are none and every check
hashes everything.

Without ``SHA256SUMS`` (a directory assembled by hand, or built by an older gill) only the files the server
loads are checked: that they exist and that their shapes fit.

This module imports no torch at load (``gill download`` and the ``gill serve`` supervisor use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from gill.config import MODEL_ARGS_FILE
from gill.errors import CheckpointError

CHECKSUMS_FILE = "SHA256SUMS"
VERIFIED_FILE = ".sha256-verified.json"
# Not listed: the lock of `gill download` (rewritten on every run) and milvus-lite's database (written by
# `gill ingest` and by the server), besides hidden files and unfinished writes (see checkpoint_files).
_UNLISTED_NAMES = frozenset({CHECKSUMS_FILE, "download-lock.json"})
_UNLISTED_SUFFIXES = (".db", ".part", ".tmp")
_CHUNK = 4 << 20  # bytes per read while hashing
_PROGRESS_BYTES = 256 << 20  # below this much to hash, no progress bar
_RACY_NS = 2_000_000_000  # a file changed this recently gets no record (file timestamps are coarse)
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_checkpoint` checked: ``listed`` files in ``SHA256SUMS`` (0 without one), of which
    ``hashed`` were hashed (``hashed_bytes`` in all) and the rest matched their record of an earlier check."""

    listed: int
    hashed: int
    hashed_bytes: int


def checkpoint_files(directory: str | Path) -> list[str]:
    """The files ``SHA256SUMS`` lists: relative POSIX paths, sorted; every regular file under ``directory``
    except hidden ones (``.complete``, the verification records), ``SHA256SUMS`` itself, ``download-lock.json``,
    ``*.db`` (milvus-lite) and unfinished writes (``*.part``, ``*.partial.*``, ``*.tmp``)."""
    directory = Path(directory)
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        name = relative.name
        if (any(part.startswith(".") for part in relative.parts) or name in _UNLISTED_NAMES
                or name.endswith(_UNLISTED_SUFFIXES) or ".partial." in name or not path.is_file()):
            continue
        if "\n" in str(relative) or "\\" in str(relative):
            raise CheckpointError(f"{path}: a name with a newline or backslash cannot be listed in "
                                  f"{CHECKSUMS_FILE}; rename it")
        found.append(relative.as_posix())
    return sorted(found)


def read_checksums(directory: str | Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` from ``directory/SHA256SUMS``, or None when there is none."""
    path = Path(directory) / CHECKSUMS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.fullmatch(line)
        relative = PurePosixPath(match.group(2)) if match else None
        if relative is None or relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(f"{path}:{number}: expected '<64 hex digits>  <relative path>' (sha256sum "
                                  f"format), got {line[:120]!r}; re-record it with `gill verify "
                                  f"{path.parent} --record`")
        entries[relative.as_posix()] = match.group(1).lower()
    return entries


def _sha256(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def _temporary(path: Path) -> Path:
    """Where to write ``path`` before renaming it: hidden (never listed) and per process (two processes that
    verify one checkpoint at once must not write into each other's file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


class _Records:
    """The ``.sha256-verified.json`` records: ``{relative path: {sha256, size, mtime_ns, ctime_ns, inode, device}}``
    of hashed files; best effort (an unreadable or unwritable file means no records)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / VERIFIED_FILE
        try:
            data = json.loads(self.path.read_text())
            self.files: dict[str, dict[str, Any]] = data["files"] if data.get("format") == 1 else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.files = {}
        if not isinstance(self.files, dict):
            self.files = {}
        self.changed = False

    def digest(self, relative: str, stat: os.stat_result) -> str | None:
        """The recorded sha256 when the file is, by every timestamp, the one that was hashed."""
        record = self.files.get(relative)
        if isinstance(record, dict) and {k: record.get(k) for k in _identity(stat)} == _identity(stat):
            return record.get("sha256")
        return None

    def add(self, relative: str, stat: os.stat_result, sha256: str, started_ns: int) -> None:
        if max(stat.st_mtime_ns, stat.st_ctime_ns) > started_ns - _RACY_NS:
            self.files.pop(relative, None)
        else:
            self.files[relative] = {"sha256": sha256, **_identity(stat)}
        self.changed = True

    def save(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        files = {k: v for k, v in sorted(self.files.items()) if k in keep}
        if not self.changed and files == self.files:
            return
        tmp = _temporary(self.path)
        try:
            tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a read-only checkpoint: every check hashes everything
            tmp.unlink(missing_ok=True)


def _progress_bar(total: int, progress: bool | None, what: str) -> tqdm | None:
    if progress is None:
        progress = total >= _PROGRESS_BYTES and sys.stderr.isatty()
    if not progress or total == 0:
        return None
    return tqdm(total=total, desc=f"sha256 {what}", unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _hash_all(directory: Path, relatives: list[str], records: _Records,
              progress: bool | None) -> tuple[dict[str, str], int, int]:
    """(``{relative: sha256}``, files hashed, bytes hashed): files unchanged since their record are not hashed;
    the others are, and get a new record."""
    digests, todo = {}, []
    bar = None
    try:
        for relative in relatives:
            stat = (directory / relative).stat()
            recorded = records.digest(relative, stat)
            if recorded is not None:
                digests[relative] = recorded
            else:
                todo.append((relative, stat))
        total = sum(stat.st_size for _, stat in todo)
        bar = _progress_bar(total, progress, str(directory))
        for relative, stat in todo:
            started = time.time_ns()
            digests[relative] = _sha256(directory / relative, bar)
            records.add(relative, stat, digests[relative], started)
    except OSError as error:
        raise CheckpointError(f"{error.filename}: cannot read it ({error.strerror})") from error
    finally:
        if bar is not None:
            bar.close()
    return digests, len(todo), total


def _write(directory: Path, digests: Mapping[str, str]) -> Path:
    path = directory / CHECKSUMS_FILE
    tmp = _temporary(path)
    # Two spaces: sha256sum's text mode, what `sha256sum -c` reads on every platform.
    tmp.write_text("".join(f"{digests[relative]}  {relative}\n" for relative in sorted(digests)))
    os.replace(tmp, path)
    return path


def write_checksums(directory: str | Path, known: Mapping[str, str] | None = None,
                    progress: bool | None = None) -> Path:
    """Write ``directory/SHA256SUMS`` listing :func:`checkpoint_files`; returns its path.

    ``known``: ``{relative path: sha256}`` the caller has just verified (``gill download``); those files are not
    hashed again. The others are hashed, except those unchanged since a recorded check. ``progress``: a bar for
    the hashing (default: when there is over 256 MiB to hash and stderr is a terminal).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    relatives = checkpoint_files(directory)
    listed = set(relatives)
    known = {k: v for k, v in (known or {}).items() if k in listed}
    records = _Records(directory)
    digests, _, _ = _hash_all(directory, [r for r in relatives if r not in known], records, progress)
    digests.update(known)
    records.save(relatives)
    return _write(directory, digests)


def update_checksums(directory: str | Path, paths: Iterable[str | Path], progress: bool | None = None) -> Path:
    """Record new contents of ``paths`` (files under ``directory``) in its ``SHA256SUMS``, keeping every other
    line; without a ``SHA256SUMS`` yet, write a whole one (:func:`write_checksums`)."""
    directory = Path(directory)
    entries = read_checksums(directory)
    if entries is None:
        return write_checksums(directory, progress=progress)
    relatives = [Path(p).resolve().relative_to(directory.resolve()).as_posix() for p in paths]
    records = _Records(directory)
    for relative in relatives:
        records.files.pop(relative, None)  # a rewritten file is hashed now, whatever its timestamps say
    entries.update(_hash_all(directory, relatives, records, progress)[0])
    records.save(entries)
    return _write(directory, entries)


def _remedy(directory: Path, relative: str) -> str:
    """What restores ``relative``: the command that wrote it."""
    from gill.convert import ADAPTERS_FILE, DECISION_FILE, EMBEDDINGS_FILE

    if relative in (ADAPTERS_FILE, DECISION_FILE, EMBEDDINGS_FILE):
        return f"re-run `gill convert {directory}` (it rewrites it from the official .pth.tar / .npy file)"
    if (directory / "download-lock.json").exists():
        return f"re-run `gill download {directory}` (it fetches every file that is missing or fails its sha256)"
    return f"rebuild it with `gill make-tiny {directory}`, or restore the file from where this checkpoint came from"


def _check_required(directory: Path) -> None:
    """The files the server loads from the checkpoint directory itself must exist."""
    from gill.convert import ADAPTERS_FILE, OFFICIAL_ADAPTERS

    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not (directory / MODEL_ARGS_FILE).is_file():
        raise CheckpointError(f"{directory / MODEL_ARGS_FILE}: missing; every checkpoint has one. Run `gill download "
                              f"{directory}` for the real weights or `gill make-tiny {directory}` for a test one")
    if not (directory / ADAPTERS_FILE).is_file():
        how = (f"run `gill convert {directory}` to convert {OFFICIAL_ADAPTERS}"
               if (directory / OFFICIAL_ADAPTERS).is_file() else
               f"run `gill download {directory}` (it fetches and converts the official files)")
        raise CheckpointError(f"{directory / ADAPTERS_FILE}: missing; {how}")


def verify_checkpoint(directory: str | Path, *, full: bool = False, shapes: bool = True,
                      progress: bool | None = None) -> Verified:
    """Refuse a checkpoint directory that is incomplete, changed or mis-shaped; raises :class:`CheckpointError`
    naming the file and saying what to run.

    Checks, cheapest first: ``model_args.json`` and ``gill_adapters.safetensors`` exist; every file listed in
    ``SHA256SUMS`` exists, and the files the server loads from the directory itself are listed; each listed
    file's sha256 (files unchanged since a recorded check are skipped unless ``full``); with ``shapes``, the
    adapters and decision head against ``model_args.json`` and the base models
    (:func:`gill.checkpoint.check_shapes`: safetensors headers and config files only, about a second).
    ``progress``: a bar for the hashing (default: over 256 MiB to hash and stderr is a terminal).
    """
    from gill.convert import ADAPTERS_FILE, DECISION_FILE, EMBEDDINGS_FILE

    directory = Path(directory)
    _check_required(directory)
    expected = read_checksums(directory)
    hashed = hashed_bytes = 0
    if expected is not None:
        missing = [r for r in expected if not (directory / r).is_file()]
        if missing:
            others = f" (also missing: {', '.join(missing[1:6])}{' ...' if len(missing) > 6 else ''})"
            raise CheckpointError(f"{directory / missing[0]}: missing (listed in {CHECKSUMS_FILE}); "
                                  f"{_remedy(directory, missing[0])}{others if len(missing) > 1 else ''}")
        for relative in (MODEL_ARGS_FILE, ADAPTERS_FILE, DECISION_FILE, EMBEDDINGS_FILE):
            if (directory / relative).is_file() and relative not in expected:
                raise CheckpointError(
                    f"{directory / relative}: not listed in {CHECKSUMS_FILE}, so its contents cannot be checked; "
                    f"if it is the file you mean to serve, record it with `gill verify {directory} --record`")
        records = _Records(directory)
        if full:
            records.files.clear()
        try:
            actual, hashed, hashed_bytes = _hash_all(directory, list(expected), records, progress)
        finally:
            records.save(expected)
        for relative, digest in expected.items():
            if actual[relative] != digest:
                raise CheckpointError(
                    f"{directory / relative}: sha256 mismatch: expected {digest} ({CHECKSUMS_FILE}), got "
                    f"{actual[relative]}; the file is damaged or was replaced. {_remedy(directory, relative)}; "
                    f"if it was changed on purpose, record it with `gill verify {directory} --record`")
    if shapes:
        from gill.checkpoint import check_shapes

        check_shapes(directory)
    return Verified(len(expected or {}), hashed, hashed_bytes)
