"""The pocket model's language model: a small OPT trained from scratch on the shapes world's text, on the CPU.

It plays OPT-6.7B's part: a frozen LM that already speaks the dialogue format GILL is served in ("Q: show me a red
circle\\nA: here is a red circle") before any adapter is trained. Its tokenizer is a byte-level BPE trained on the
same text and saved as OPT's ``GPT2Tokenizer``, so :func:`gill.tokens.load_tokenizer` adds ``<|image|>`` and
``[IMG0..7]`` after its vocabulary exactly as for OPT. The ``[IMG]`` tokens are not in its training text: as with
OPT, only GILL's training gives them meaning.

Usage::

    train_lm(Path("pocket/lm"), World(seed=0), LMConfig(), seed=0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gill.pocket.world import World


@dataclass(frozen=True)
class LMConfig:
    """Sizes and budget of the pocket LM (0.86 M parameters, a 365-token BPE: the world's text has ~60 words)."""

    width: int = 128
    # Four layers: the dialogue answers restate the question ("here is a red circle on a blue background"), and
    # with two layers the copy was still wrong in most full captions after 1,500 steps. With three, the copy was
    # right but the [IMG0] state after a held-out scene told its colours' roles apart less often: a retrieval-only
    # probe put the right held-out scene first for 56% of "show me" answers, against 81% with four layers.
    layers: int = 4
    heads: int = 4
    # The longest training document is ~70 tokens; a served turn with an image prefix stays well under 128.
    max_positions: int = 256
    vocab_size: int = 600
    documents: int = 20_000
    steps: int = 3500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100

    def quick(self) -> LMConfig:
        """A few steps of the same model, for tests of the build."""
        return replace(self, documents=500, steps=20, batch_size=16)


def _batches(ids: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless right-padded batches: ``input_ids [B, T]`` int64, ``attention_mask [B, T]``, ``labels [B, T]``
    (-100 at pads)."""
    while True:
        chosen = [ids[rng.randrange(len(ids))] for _ in range(batch_size)]
        length = max(map(len, chosen))
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, document in enumerate(chosen):
            input_ids[row, :len(document)] = torch.tensor(document)
            mask[row, :len(document)] = 1
        yield input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def train_lm(directory: Path, world: World, config: LMConfig, seed: int, progress: bool = True) -> float:
    """Train the tokenizer and the LM on ``config.documents`` documents of ``world``; save both to ``directory``
    (``from_pretrained`` layout). Returns the mean loss of the last 50 steps (nats per token)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, get_cosine_schedule_with_warmup

    from gill.tiny import build_tokenizer

    rng = random.Random(f"lm-{seed}")
    documents = world.lm_corpus(rng, config.documents)
    build_tokenizer(directory, vocab_pad_to=None, lines=documents, vocab_size=config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # BOS (prepended by the tokenizer, as OPT's) + text + EOS, so the LM learns where a document ends.
    ids = [encoded + [tokenizer.eos_token_id] for encoded in tokenizer(documents).input_ids]

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=config.width, num_hidden_layers=config.layers,
        ffn_dim=config.width * 4, num_attention_heads=config.heads, max_position_embeddings=config.max_positions,
        word_embed_proj_dim=config.width, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    batches = _batches(ids, config.batch_size, tokenizer.pad_token_id, rng)
    recent: list[float] = []
    bar = tqdm(range(config.steps), desc="pocket LM", disable=not progress)
    for _ in bar:
        input_ids, mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
    model.eval().save_pretrained(directory)
    return sum(recent) / len(recent)
