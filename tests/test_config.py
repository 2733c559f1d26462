import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gill.cli import app
from gill.config import GILLArgs
from gill.describe import describe
from gill.errors import CheckpointError

PAPER = Path(__file__).resolve().parent.parent / "checkpoints" / "gill_opt"


def test_paper_config_has_the_reference_values():
    args = GILLArgs.load(PAPER)
    assert args.opt_version == "facebook/opt-6.7b"
    assert args.visual_encoder == "openai/clip-vit-large-patch14"
    assert (args.n_visual_tokens, args.ret_emb_dim, args.gen_emb_dim) == (4, 256, 768)
    assert (args.num_tokens, args.num_clip_tokens) == (8, 77)
    assert args.retrieval_token_idx == tuple(range(50266, 50274)) == args.gen_token_idx
    assert args.text_emb_layers == (-1,)


def test_round_trip_keeps_reference_fields(tmp_path):
    args = GILLArgs.load(PAPER)
    args.save(tmp_path)
    saved = json.loads((tmp_path / "model_args.json").read_text())
    original = json.loads((PAPER / "model_args.json").read_text())
    assert {k: saved[k] for k in original} == original
    assert GILLArgs.load(tmp_path) == args


@pytest.mark.parametrize("change, message", [
    ({"mystery_field": 1}, "unknown fields"),
    ({"text_emb_layers": [-2]}, "text_emb_layers"),
    ({"text_fc_mode": "linear"}, "text_fc_mode"),
    ({"n_visual_tokens": 0}, "n_visual_tokens"),
])
def test_bad_config_is_refused_with_the_field_named(tmp_path, change, message):
    data = json.loads((PAPER / "model_args.json").read_text()) | change
    (tmp_path / "model_args.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        GILLArgs.load(tmp_path)


def test_missing_config_says_what_is_expected(tmp_path):
    with pytest.raises(CheckpointError, match="model_args.json"):
        GILLArgs.load(tmp_path)


def test_describe_counts_the_papers_trainable_parameters():
    description = describe(PAPER)
    assert description.total("trainable") == 50_096_385
    rows = {name: count for name, _, count, _ in description.rows}
    assert rows["gen_text_hidden_fcs.0 (GILLMapper)"] == 31_958_784
    assert rows["  of which tfm"] == 29_427_712
    assert rows["visual_embeddings"] == 1024 * 4 * 4096 + 4 * 4096


def test_describe_cli_prints_the_count():
    result = CliRunner().invoke(app, ["describe", str(PAPER)])
    assert result.exit_code == 0, result.output
    assert "trainable parameters: 50,096,385" in result.output


def test_describe_works_on_a_local_checkpoint(tiny_dir):
    description = describe(tiny_dir)
    assert 0 < description.total("trainable") < 1_000_000
