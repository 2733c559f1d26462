from gill.tiny import build_tokenizer
from gill.tokens import IMAGE_TOKEN, load_tokenizer


def test_added_tokens_follow_the_reference_order(tiny_dir):
    tokenizer, tokens = load_tokenizer(str(tiny_dir / "lm"), 8)
    base = tokens.image
    assert tokenizer.convert_ids_to_tokens(base) == IMAGE_TOKEN
    assert tokens.img == tuple(range(base + 1, base + 9))
    assert tokens.vocab_size == len(tokenizer) == base + 9
    assert tokens.eos == 2 and tokens.pad == 1
    assert tokenizer("hello").input_ids[0] == 2, "OPT prepends </s> as BOS"


def test_opt_sized_vocabulary_gives_the_papers_ids(tmp_path):
    # A 50,265-entry base vocabulary (OPT's) puts <|image|> at 50265 and [IMG0..7] at 50266-50273.
    build_tokenizer(tmp_path, vocab_pad_to=50265)
    tokenizer, tokens = load_tokenizer(str(tmp_path), 8)
    assert tokens.image == 50265
    assert tokens.img == tuple(range(50266, 50274))
    assert len(tokenizer) == 50274


def test_loading_twice_adds_nothing_twice(tiny_dir):
    tokenizer, tokens = load_tokenizer(str(tiny_dir / "lm"), 8)
    tokenizer.add_tokens([f"[IMG{i}]" for i in range(8)])
    assert len(tokenizer) == tokens.vocab_size


def test_checkpoint_records_the_tokenizers_ids(tiny_dir, pipeline):
    assert pipeline.components.model.args.retrieval_token_idx == pipeline.components.model.tokens.img
