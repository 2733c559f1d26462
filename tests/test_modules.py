import torch
from PIL import Image

from gill.adapters import GILLAdapters
from gill.config import GILLArgs
from gill.tiny import shape_image


def _states(model, n=1):
    torch.manual_seed(0)
    return torch.randn(n, 8, model.lm_width)


def test_visual_prefix_and_image_retrieval_shapes(pipeline):
    model = pipeline.components.model
    images = [shape_image("red", "circle", "blue", 40), Image.new("RGB", (17, 50), (1, 2, 3))]
    prefix, vectors = model.encode_images(images)
    assert prefix.shape == (2, model.args.n_visual_tokens, model.lm_width)
    assert vectors.shape == (2, model.args.ret_emb_dim)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))


def test_image_side_heads(pipeline):
    model = pipeline.components.model
    states = _states(model, 3)
    query = model.text_retrieval_embedding(states)
    assert query.shape == (3, 256)
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(3))
    # Retrieval reads only the [IMG0] slot.
    changed = states.clone()
    changed[:, 1:] += 5
    torch.testing.assert_close(model.text_retrieval_embedding(changed), query)
    decision = model.decide(states)
    assert decision.probabilities.shape == (3, 2)
    torch.testing.assert_close(decision.probabilities.sum(-1), torch.ones(3))
    assert set(decision.choices) <= {"gen", "ret"}
    prompt = model.prompt_embeddings(states)
    assert prompt.shape == (3, 77, model.args.gen_emb_dim)


def test_mapper_adds_the_img_token_embeddings(pipeline):
    model = pipeline.components.model
    states = _states(model)
    mapper = model.adapters.gen_text_hidden_fcs[0]
    with torch.no_grad():
        expected = mapper(states, model.img_token_embeddings()[None])
        without_residual = mapper(states, torch.zeros_like(states))
    torch.testing.assert_close(model.prompt_embeddings(states), expected)
    assert not torch.allclose(expected, without_residual)


def test_paper_sized_mapper_structure():
    with torch.device("meta"):
        adapters = GILLAdapters(GILLArgs(), 4096, 1024)
    mapper = adapters.gen_text_hidden_fcs[0]
    assert mapper.fc.in_features == 4096 and mapper.fc.out_features == 512
    assert len(mapper.tfm.encoder.layers) == 4 and len(mapper.tfm.decoder.layers) == 4
    assert mapper.tfm.encoder.layers[0].self_attn.num_heads == 4
    assert mapper.tfm.encoder.layers[0].norm_first
    assert mapper.query_embs.shape == (1, 77, 512)
    assert mapper.model.out_features == 768
    assert adapters.visual_embeddings.out_features == 4 * 4096


def test_decision_reads_the_img0_state(pipeline):
    model = pipeline.components.model
    states = _states(model)
    changed = states.clone()
    changed[:, 1:] = 0
    torch.testing.assert_close(model.decide(states).probabilities, model.decide(changed).probabilities)
