"""``gill make-pocket --quick``: every stage runs (a few steps each) and the result is a whole, loadable checkpoint.

The quality of the full build is tested on the committed checkpoint (tests/test_pocket_served.py); this proves the
build itself, which CI cannot afford to run at full length.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gill.cli import app
from gill.pocket.world import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick_pocket(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pocket") / "pocket"
    result = CliRunner().invoke(app, ["make-pocket", str(directory), "--quick", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return directory


def test_layout_and_report(quick_pocket):
    from gill.config import GILLArgs
    from gill.integrity import verify_checkpoint

    for name in ("lm/config.json", "clip/config.json", "sd/unet/config.json", "sd/vae/config.json",
                 "sd/text_encoder/config.json", "sd/tokenizer/vocab.json", "model_args.json",
                 "gill_adapters.safetensors", "decision_model.safetensors", "retrieval_embeddings.npz",
                 "retrieval_captions.json", "SHA256SUMS"):
        assert (quick_pocket / name).is_file(), name
    verify_checkpoint(quick_pocket, full=True)
    args = GILLArgs.load(quick_pocket)
    assert (args.opt_version, args.visual_encoder, args.sd_version) == ("lm", "clip", "sd")  # relative: movable
    report = json.loads((quick_pocket / "pocket.json").read_text())
    assert report["seed"] == 3
    assert report["heldout_scenes"] == [scene.caption for scene in World(seed=3).heldout_scenes]
    for stage in ("lm_loss", "clip_top1", "diffusion", "adapters", "decision"):
        assert stage in report, stage
    captions = json.loads((quick_pocket / "retrieval_captions.json").read_text())
    assert len(captions) == 168 and all((quick_pocket / path).is_file() for path in captions)


def test_the_build_answers_a_turn_with_an_image(quick_pocket, tmp_path):
    from gill.options import GenerationOptions
    from gill.pipeline import Pipeline

    pipeline = Pipeline.from_checkpoint(quick_pocket, device="cpu")
    image = World(seed=3).render(World(seed=3).train_scenes[0])
    result = pipeline.run([image, "Q: show me a red circle\nA:"],
                          GenerationOptions(max_new_tokens=4, gen_scale_factor=1e5, min_word_tokens=1,
                                            num_inference_steps=2, seed=0))
    assert result.done.generated_tokens >= 1
    assert len(result.images) == 1 and result.images[0].image.size == (32, 32)


def test_the_committed_checkpoint_is_what_the_defaults_build():
    """Changing a stage's configuration without rebuilding the committed checkpoint fails here: run
    `gill make-pocket gill/data/pocket` (it rebuilds that stage and the ones after it)."""
    from gill.pocket.build import PocketConfig, built_fingerprints, stage_fingerprints
    from gill.pocket.default import pocket_checkpoint

    assert built_fingerprints(pocket_checkpoint()) == stage_fingerprints(PocketConfig())


def test_a_rerun_skips_built_stages_and_rebuilds_a_changed_one(quick_pocket, monkeypatch):
    from dataclasses import replace

    from gill.pocket import build
    from gill.pocket.build import PocketConfig, built_fingerprints, make_pocket, stage_fingerprints

    config = PocketConfig(seed=3).quick()
    assert built_fingerprints(quick_pocket) == stage_fingerprints(config)
    calls = []
    monkeypatch.setattr(build, "train_lm", lambda *args: calls.append("lm"))
    monkeypatch.setattr(build, "_clip_stage", lambda *args: calls.append("clip"))
    monkeypatch.setattr(build, "_diffusion_stage", lambda *args: calls.append("diffusion") or {})
    monkeypatch.setattr(build, "_adapter_stage", lambda *args: calls.append("adapters") or {})
    make_pocket(quick_pocket, config, progress=False)
    assert calls == []
    changed = replace(config, diffusion=replace(config.diffusion, unet_steps=5))
    make_pocket(quick_pocket, changed, progress=False)
    assert calls == ["diffusion", "adapters"]
    assert built_fingerprints(quick_pocket) == stage_fingerprints(changed)


def test_a_bad_directory_is_a_readable_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(app, ["make-pocket", str(blocker / "pocket"), "--quick"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
