import torch
from safetensors.torch import load_file

from gill.tiny import make_checkpoint


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_dir):
    again = make_checkpoint(tmp_path / "again", seed=0)
    other = make_checkpoint(tmp_path / "other", seed=1)
    reference = load_file(tiny_dir / "gill_adapters.safetensors")
    same = load_file(again / "gill_adapters.safetensors")
    different = load_file(other / "gill_adapters.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert (again / "SHA256SUMS").read_text() == (tiny_dir / "SHA256SUMS").read_text()  # byte for byte, every file
    assert not torch.equal(reference["model.visual_fc.weight"], different["model.visual_fc.weight"])
    for name in ("model.decoder.layers.0.fc1.weight", "model.decoder.embed_tokens.weight"):
        assert torch.equal(load_file(again / "lm" / "model.safetensors")[name],
                           load_file(tiny_dir / "lm" / "model.safetensors")[name])


def test_layout_matches_the_real_checkpoint(tiny_dir):
    for name in ("model_args.json", "gill_adapters.safetensors", "decision_model.safetensors",
                 "retrieval_embeddings.npz", "pretrained_ckpt.pth.tar", "decision_model.pth.tar",
                 "cc3m_embeddings_urls.npy", "lm/config.json", "lm/vocab.json", "lm/merges.txt",
                 "clip/config.json", "clip/preprocessor_config.json", "sd/model_index.json",
                 "sd/unet/config.json", "sd/vae/config.json", "sd/scheduler/scheduler_config.json"):
        assert (tiny_dir / name).exists(), name
