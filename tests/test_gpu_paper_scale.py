"""The paper-scale GPU benchmark in its tiny CPU mode, and the meta-device footprint of the paper's stack."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import footprint  # noqa: E402  (bench/footprint.py)
import gpu_paper_scale  # noqa: E402  (bench/gpu_paper_scale.py: the script the lead runs on a lent GPU)

GIB = 2**30


def test_tiny_mode_runs_every_stage_and_writes_its_outputs(tmp_path: Path) -> None:
    result = gpu_paper_scale.main(["--shapes", "tiny", "--device", "cpu", "--out", str(tmp_path)])

    assert torch.get_default_dtype() == torch.float32, "the dtype used to build the modules must be restored"
    text = (tmp_path / "gpu_paper_scale.md").read_text()
    assert text.startswith("<!-- gpu-paper-scale -->") and text.rstrip().endswith("<!-- /gpu-paper-scale -->")
    for heading in ("#### Decoding", "#### Image generation", "#### CLIP image encoding", "#### GPU memory"):
        assert heading in text
    raw = json.loads((tmp_path / "gpu_paper_scale.json").read_text())
    for key in ("environment", "command", "bandwidth", "decode", "images", "clip", "mapper_s", "memory",
                "weight_bytes", "build_s", "total_s"):
        assert key in raw, key
    assert raw["command"].startswith("python bench/gpu_paper_scale.py --shapes tiny")
    assert {r["method"] for r in raw["decode"]} == {"gill.decoding.Decoder", "plain DynamicCache loop"}
    assert {(r["batch"], r["prompt"]) for r in raw["decode"]} == {(1, 16), (8, 16), (8, 96)}
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_bound_measured"] for r in raw["decode"])
    assert [r["steps"] for r in raw["images"]["rows"]] == [2, 3]
    assert raw["images"]["prompt_shape"] == [1, 77, 32]
    assert [r["batch"] for r in raw["clip"]] == [1, 8]
    assert raw["memory"]["phases"] == {} and raw["memory"]["peak_allocated"] is None  # CUDA only
    assert result["weight_bytes"]["lm"] > 0


def test_memory_section_formats_cuda_figures(tmp_path: Path) -> None:
    # The CUDA-only branch of the report, fed with made-up figures, so a formatting slip cannot waste a GPU run.
    result = copy.deepcopy(gpu_paper_scale.main(["--shapes", "tiny", "--device", "cpu", "--repeats", "1"]))
    result["memory"] = dict(resident_allocated=15 * GIB, resident_reserved=16 * GIB,
                            phases={"decode x batch 8 prompt 16": dict(allocated=16 * GIB, reserved=17 * GIB),
                                    "image 50 steps": dict(allocated=17 * GIB, reserved=18 * GIB)},
                            peak_allocated=17 * GIB, peak_reserved=18 * GIB, both_at_once=18 * GIB,
                            both_at_once_estimate=19 * GIB)
    text = gpu_paper_scale.markdown(result)
    assert "| image 50 steps | 17.00 | 18.00 |" in text
    assert "**18.00 GiB allocated**" in text and "leaves 6.00 GiB of a 24 GiB card" in text


def test_footprint_counts_the_published_parameter_totals() -> None:
    result = footprint.measure(footprint.PAPER)
    params = {row["name"]: row["parameters"] for row in result["components"]}
    assert params["OPT-6.7B language model"] == 6_658_482_176  # 6.7B with the 50274-row tied embedding
    assert params["CLIP ViT-L/14 vision tower"] == 303_179_776
    assert params["GILL adapters (mapper, projections)"] == 50_096_385  # gill.md: the released checkpoint's count
    assert params["SD v1.5 UNet"] == 859_520_964
    assert params["SD v1.5 VAE"] == 83_653_863
    assert params["SD v1.5 CLIP text encoder"] == 123_060_480
    assert result["kv_bytes_per_token"] == 2 * 32 * 4096 * 2
    verdict = footprint.fit(result, card_gib=24, headroom_gib=2)
    assert verdict["fits"] and not verdict["fits_fp32"]
    assert verdict["kv_bytes_per_dialogue"] == GIB
    assert 14 * GIB < verdict["weights_16bit"] < 16 * GIB
    assert verdict["full_window_dialogues"] == 6
