"""Regenerate the Python code of the wire contract (``*_pb2.py`` and typed ``*_pb2.pyi`` stubs).

The code lives in the light client package, ``client/src/gill_client/v1/``, which the server (``gill``) also
imports: one copy of the contract for both sides. Run with the project's virtualenv (it provides
``grpc_tools`` and mypy-protobuf's ``protoc-gen-mypy``)::

    .venv/bin/python protos/generate.py            # write into the repository (client/src/gill_client/v1/)
    .venv/bin/python protos/generate.py --check    # exit 1, listing stale files, if the committed code differs
    .venv/bin/python protos/generate.py --out DIR  # write under DIR instead (DIR/gill_client/v1/...)

``protos/gill/v1/x.proto`` (proto package ``gill.v1``) compiles to the Python module
``gill_client.v1.x_pb2``: protoc names modules after the file's path, so the files are compiled from a
temporary copy laid out as ``gill_client/v1/``. Output depends only on the .proto files and the pinned
grpcio-tools / mypy-protobuf versions.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
# proto package directory under protos/ -> Python package directory it compiles to
PACKAGES = {"gill/v1": "gill_client/v1"}
DEFAULT_OUT = REPO_ROOT / "client" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def _note(proto: str) -> str:
    return f"# Generated from protos/{proto}: do not edit; run protos/generate.py.\n"


def proto_files() -> list[str]:
    """Proto paths relative to ``protos/`` (the import root), sorted for a stable order."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for d in PACKAGES for p in (PROTO_ROOT / d).glob("*.proto"))


def _mypy_plugin() -> str:
    candidate = Path(sys.executable).parent / "protoc-gen-mypy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("protoc-gen-mypy")
    if found is None:
        raise SystemExit("protoc-gen-mypy not found next to the Python interpreter or on PATH; "
                         "install mypy-protobuf into this environment")
    return found


def _python_path(proto: str) -> str:
    """``gill/v1/dialogue.proto`` -> ``gill_client/v1/dialogue.proto`` (where its module lives)."""
    directory, _, name = proto.rpartition("/")
    return f"{PACKAGES[directory]}/{name}"


def generate(out: Path) -> list[Path]:
    """Generate into ``out`` (files land in ``out/gill_client/v1/``); returns the written files, relative to
    ``out``."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for proto in protos:
            target = staged / _python_path(proto)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PROTO_ROOT / proto, target)
        args = ["grpc_tools.protoc", f"-I{staged}", f"-I{well_known}", f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
                f"--python_out={out}", f"--mypy_out={out}", *(str(staged / _python_path(p)) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see the messages above)")
    written = []
    for proto in protos:
        stem = _python_path(proto).removesuffix(".proto")
        for suffix in GENERATED_SUFFIXES:
            path = out / f"{stem}{suffix}"
            path.write_text(_note(proto) + path.read_text(encoding="utf-8"), encoding="utf-8")
            written.append(path.relative_to(out))
    return written


def check(target: Path) -> list[str]:
    """Regenerate into a temporary directory; returns the stale, missing or extra files under ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for rel in fresh:
            committed = target / rel
            if not committed.exists():
                problems.append(f"{rel} (missing)")
            elif not filecmp.cmp(committed, Path(tmp) / rel, shallow=False):
                problems.append(f"{rel} (differs)")
        expected = {rel.as_posix() for rel in fresh}
        for d in PACKAGES.values():
            for suffix in GENERATED_SUFFIXES:
                for path in sorted((target / d).glob(f"*{suffix}")):
                    name = path.relative_to(target).as_posix()
                    if name not in expected:
                        problems.append(f"{name} (no .proto generates it)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="root to write into; files land in OUT/gill_client/v1/ (default: client/src)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 listing the files under OUT that are stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        if problems:
            print("generated protocol code is stale; run: python protos/generate.py", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        print("generated protocol code is up to date")
        return 0
    for rel in generate(args.out):
        print(f"wrote {args.out / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
