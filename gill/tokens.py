"""The tokenizer and GILL's added tokens.

As the reference: the OPT tokenizer, then a ``cls_token`` ``<|image|>`` (id 50265 for OPT), then
``[IMG0]`` .. ``[IMG7]`` with ``add_tokens`` (ids 50266-50273 for OPT). ``<|image|>`` is only used for
masking in training; the ``[IMG]`` tokens mark where an image is retrieved or generated.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

IMAGE_TOKEN = "<|image|>"


def img_token_strings(num_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_tokens)]


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the decoder needs; ``img`` is ``[IMG0..7]`` in order."""

    img: tuple[int, ...]
    image: int
    eos: int
    pad: int
    newline: int
    vocab_size: int


def load_tokenizer(source: str, num_tokens: int) -> tuple[PreTrainedTokenizerBase, SpecialTokens]:
    """Load the LM tokenizer from a hub id or path and add GILL's tokens exactly as the reference does."""
    # The reference asks for the slow tokenizer (use_fast=False); transformers 5 has one tokenizer
    # class per model, and it gives the same ids for OPT's byte-level BPE.
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.cls_token != IMAGE_TOKEN:
        tokenizer.add_special_tokens({"cls_token": IMAGE_TOKEN})
    tokenizer.add_tokens(img_token_strings(num_tokens))
    return tokenizer, special_tokens(tokenizer, num_tokens)


def special_tokens(tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> SpecialTokens:
    img = tuple(tokenizer.convert_tokens_to_ids(img_token_strings(num_tokens)))
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    return SpecialTokens(
        img=img,
        image=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        newline=newline[0],
        vocab_size=len(tokenizer),
    )
