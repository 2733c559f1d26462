"""The same ingest and retrieval code against a real Milvus server (Milvus 2.3.5 standalone via
``gill.milvus_server``, the deployment for CC3M scale).

Milvus 2.3 listens on every interface, and tests may bind loopback only: the checks run in a new network
namespace whose one interface is loopback (``unshare -rn``, unprivileged user and network namespaces)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("milvus_server_checks.py")
ROOT = Path(__file__).resolve().parent.parent


def _namespaces() -> str | None:
    """Why the checks cannot run here, or None when they can."""
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare to give Milvus a loopback-only network namespace"
    try:
        import milvus  # noqa: F401
    except ImportError:
        return "needs the milvus wheel (pip install 'gill[milvus-server]')"
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode:
        return f"unprivileged network namespaces are not allowed here ({probe.stderr.strip()})"
    return None


WHY_NOT = _namespaces()


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
def test_ingest_resume_and_search_against_a_milvus_server(tmp_path):
    run = subprocess.run(["unshare", "-rn", sys.executable, str(CHECKS), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    small = report["small"]
    assert small["first"] == 1500  # the ingest that was cut short, mid-batch (204 rows a batch)
    # Resumed: 7 whole batches skipped, the batch cut in two upserted, the rest inserted; no duplicates.
    assert small["resumed"] == [3000 - 1428, 1428, 3000]
    assert small["again"] == [0, 3000, 3000]  # a re-run writes nothing
    assert small["index"] == "FLAT" and small["exact_matches"] == 8  # the reference's hits and scores
    large = report["large"]
    assert (large["index"], large["nlist"], large["nprobe"]) == ("IVF_FLAT", 1024, 8)
    assert large["indexed"] == large["total"] == 60_000  # sealed and indexed by the server before ingest returns
    assert large["self_found"] == 50
    assert report["while_down"].startswith("RetrievalUnavailable: ")
    assert report["back"] is not None and report["back"]["first_hit"], report["back"]  # and back, same retriever
