"""``gill make-pocket DIR``: the pocket GILL, every part trained from scratch on the CPU in the shapes world.

Stages, in order (each one reads what the ones before it wrote into ``DIR``)::

    lm/                 the frozen LM: a small OPT and its BPE tokenizer (gill.pocket.lm)
    clip/               GILL's image encoder: the vision tower of a small CLIP (gill.pocket.clip)
    sd/                 Stable Diffusion: the CLIP's text tower as text encoder, a VAE and UNet trained on
                        the world's images (gill.pocket.diffusion)
    model_args.json     GILL's architecture on those parts, with the paper's token layout
    gill_adapters.safetensors   GILL's adapters, trained by the project's own trainer (``gill train``) on
                        captioned images of the training scenes, with SD targets from ``sd/``
    decision_model.safetensors  the retrieve-or-generate head (``gill train-decision``): "show me" retrieves,
                        "draw" generates
    retrieval_images/, retrieval_embeddings.npz, retrieval_captions.json
                        the retrieval corpus: one image of every scene of the world, held-out ones included
    pocket.json         the seed, the world's held-out scenes, and what each stage measured
    SHA256SUMS          every file above

The same seed on the same machine gives the same weights; ``quick=True`` runs a few steps of each stage (for tests
of the build itself: the result has the right layout, not the quality).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gill.config import GILLArgs
from gill.pocket.clip import CLIPTrainConfig, char_tokenizer, clip_accuracy, save_clip, train_clip
from gill.pocket.diffusion import DiffusionConfig, build_diffusion
from gill.pocket.lm import LMConfig, train_lm
from gill.pocket.world import TWIN_GROUP, Pair, World, all_scenes

logger = logging.getLogger(__name__)

POCKET_INFO_FILE = "pocket.json"
CORPUS_DIR = "retrieval_images"


@dataclass(frozen=True)
class AdapterConfig:
    """GILL's adapters on the pocket parts: the paper's structure, narrower (the LM is 128 wide, not 4096)."""

    n_visual_tokens: int = 4
    ret_emb_dim: int = 64
    mapper_hidden_dim: int = 64
    mapper_num_layers: int = 2
    mapper_num_heads: int = 4
    train_pairs: int = 6000
    val_pairs: int = 256
    # 1,500 steps gave retrieval top-1 (colour and shape) 48% served; 3,000 gave 60% and was still improving.
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    # Dialogue texts ("Q: show me ...\nA: here is ...") run to ~30 tokens before the 8 [IMG] tokens.
    max_len: int = 48
    decision_prompts: int = 1000
    decision_train: int = 800
    # Training pairs in groups of a scene and its twins (World.twins), kept in one batch (``group_size``): hard
    # negatives for the contrastive loss. Against random batches, on the same parts: retrieval top-1 38 of 40
    # prompts against 37, the "show me" query's colour and shape right for 94% of training scenes against 89%.
    twin_groups: bool = True

    def quick(self) -> AdapterConfig:
        return replace(self, train_pairs=48, val_pairs=16, steps=3, batch_size=8, warmup_steps=1,
                       decision_prompts=40, decision_train=30)


@dataclass(frozen=True)
class PocketConfig:
    seed: int = 0
    lm: LMConfig = field(default_factory=LMConfig)
    clip: CLIPTrainConfig = field(default_factory=CLIPTrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)

    def quick(self) -> PocketConfig:
        return replace(self, lm=self.lm.quick(), clip=self.clip.quick(), diffusion=self.diffusion.quick(),
                       adapters=self.adapters.quick())


def _write_pairs(root: Path, split: str, pairs: list[Pair]) -> tuple[Path, Path]:
    """CC3M-format TSVs (caption, image) and their PNGs under ``root``: ``{split}.tsv`` holds the text GILL reads,
    ``{split}-captions.tsv`` the same images with the plain captions that SD's targets are computed from."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    tsvs = root / f"{split}.tsv", root / f"{split}-captions.tsv"
    with open(tsvs[0], "w", newline="", encoding="utf-8") as texts, \
            open(tsvs[1], "w", newline="", encoding="utf-8") as captions:
        writers = [csv.writer(handle, delimiter="\t", lineterminator="\n") for handle in (texts, captions)]
        for writer in writers:
            writer.writerow(("caption", "image"))
        for index, pair in enumerate(pairs):
            relative = f"images/{split}-{index:06d}.png"
            pair.image.save(root / relative)
            writers[0].writerow((pair.text, relative))
            writers[1].writerow((pair.caption, relative))
    return tsvs


def _write_corpus(directory: Path, world: World, seed: int) -> tuple[list[str], list[str]]:
    """One image of every scene (a jitter no training set used); returns their relative paths and captions."""
    rng = random.Random(f"corpus-{seed}")
    (directory / CORPUS_DIR).mkdir(exist_ok=True)
    paths, captions = [], []
    for index, scene in enumerate(all_scenes()):
        relative = f"{CORPUS_DIR}/{index:05d}.png"
        world.render(scene, rng).save(directory / relative)
        paths.append(relative)
        captions.append(scene.caption)
    return paths, captions


def _embed_corpus(directory: Path, paths: list[str], captions: list[str]) -> None:
    """``retrieval_embeddings.npz`` with the trained ``visual_fc`` (raw vectors, as the official corpus stores)."""
    from PIL import Image

    from gill.convert import EMBEDDINGS_FILE
    from gill.model import GILL
    from gill.retrieval import CAPTIONS_FILE

    model = GILL.from_checkpoint(directory, device="cpu", dtype=torch.float32, parts=("vision",))
    images = [Image.open(directory / path).convert("RGB") for path in paths]
    with torch.no_grad():
        pixels = model.image_processor(images=images, return_tensors="pt").pixel_values
        vectors = model.adapters.visual_fc(model.vision(pixel_values=pixels).pooler_output).numpy()
    np.savez(directory / EMBEDDINGS_FILE, embeddings=vectors.astype(np.float32), urls=np.array(paths, dtype=np.str_))
    (directory / CAPTIONS_FILE).write_text(json.dumps(dict(zip(paths, captions, strict=True)), indent=1))


def _model_args(directory: Path, clip: CLIPTrainConfig, adapters: AdapterConfig) -> GILLArgs:
    from gill.tokens import load_tokenizer

    args = replace(GILLArgs(), opt_version="lm", visual_encoder="clip", sd_version="sd",
                   n_visual_tokens=adapters.n_visual_tokens, ret_emb_dim=adapters.ret_emb_dim,
                   gen_emb_dim=clip.text_width, mapper_hidden_dim=adapters.mapper_hidden_dim,
                   mapper_num_layers=adapters.mapper_num_layers, mapper_num_heads=adapters.mapper_num_heads)
    _, tokens = load_tokenizer(str(directory / "lm"), args.num_tokens)
    return replace(args, retrieval_token_idx=tokens.img, gen_token_idx=tokens.img)


def _train_adapters(directory: Path, world: World, config: AdapterConfig, seed: int, work: Path,
                    progress: bool) -> dict[str, Any]:
    """``gill train`` on captioned images of the training scenes; copies the best export's adapters in."""
    from gill.convert import ADAPTERS_FILE
    from gill.training.sd_targets import preprocess_sd_targets
    from gill.training.trainer import TrainConfig, train

    rng = random.Random(f"adapters-{seed}")
    data = work / "data"
    train_tsv, train_captions = _write_pairs(data, "train", world.pairs(config.train_pairs, rng,
                                                                       twin_groups=config.twin_groups))
    val_tsv, val_captions = _write_pairs(data, "val", world.pairs(config.val_pairs, rng))
    for captions in (train_captions, val_captions):  # keyed by image path, so the text TSVs find them
        preprocess_sd_targets(captions, directory, data / "targets", progress=progress)
    result = train(TrainConfig(
        checkpoint=str(directory), train_data=str(train_tsv), val_data=str(val_tsv), out_dir=str(work / "run"),
        targets_dir=str(data / "targets"), steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        warmup_steps=config.warmup_steps, lr_step_size=config.steps, num_workers=0, seed=seed, max_len=config.max_len,
        group_size=TWIN_GROUP if config.twin_groups else 1,
        val_every=max(1, config.steps // 3), save_every=config.steps, log_every=max(1, config.steps // 30),
        device="cpu", tensorboard=False, progress=progress))
    shutil.copyfile((result.best_dir or result.export_dir) / ADAPTERS_FILE, directory / ADAPTERS_FILE)
    return {key: value for key, value in result.as_dict().items()
            if key in ("steps", "losses", "validation", "best_step", "best_text_to_image_top1", "skipped_samples",
                       "samples_per_second")}


def _train_decision(directory: Path, world: World, config: AdapterConfig, seed: int, work: Path,
                    progress: bool) -> dict[str, Any]:
    from gill.training.decision import DecisionTrainingConfig, train_decision

    annotations = work / "decisions.tsv"
    rows = world.decision_rows(random.Random(f"decision-{seed}"), config.decision_prompts)
    annotations.write_text("Prompt\tDecision\n" + "".join(f"{p.replace(chr(10), ' ')}\t{label}\n"
                                                          for p, label in rows))
    result = train_decision(directory, annotations, DecisionTrainingConfig(train_size=config.decision_train),
                            device="cpu", progress=progress)
    return {"validation_macro_f1": result.validation.macro_f1, "majority_baseline_macro_f1": result.baseline.macro_f1}


def _next_fingerprint(chain: str, name: str, config: Any) -> str:
    return hashlib.sha256(f"{chain}|{name}|{config!r}".encode()).hexdigest()


def stage_fingerprints(config: PocketConfig) -> dict[str, str]:
    """The fingerprint of each stage that ``config`` builds, in build order (what the markers record)."""
    chain, prints = f"seed={config.seed}", {}
    for name, stage in (("lm", config.lm), ("clip", config.clip), ("diffusion", config.diffusion),
                        ("adapters", config.adapters)):
        chain = prints[name] = _next_fingerprint(chain, name, stage)
    return prints


def built_fingerprints(directory: str | Path) -> dict[str, str | None]:
    """The fingerprint each stage's marker in ``directory`` records (None: not built)."""
    prints: dict[str, str | None] = {}
    for name in ("lm", "clip", "diffusion", "adapters"):
        try:
            prints[name] = json.loads((Path(directory) / f".pocket-{name}.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            prints[name] = None
    return prints


class _Stages:
    """Runs the build's stages in order, each at most once per configuration: a stage that finished writes a
    hidden marker (``.pocket-<stage>.json``: its fingerprint and what it measured), and a later build with the
    same fingerprint skips it. A fingerprint covers the seed, the stage's configuration and every earlier stage's
    fingerprint, so changing one stage rebuilds it and everything after it. An interrupted build resumes at the
    first unfinished stage."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.chain = f"seed={seed}"

    def run(self, name: str, config: Any, build: Callable[[], Any]) -> Any:
        self.chain = _next_fingerprint(self.chain, name, config)
        marker = self.directory / f".pocket-{name}.json"
        try:
            saved = json.loads(marker.read_text())
            if saved.get("fingerprint") == self.chain:
                logger.info("pocket stage %s: already built, skipped", name)
                return saved["result"]
        except (OSError, ValueError):
            pass
        marker.unlink(missing_ok=True)
        result = build()
        marker.write_text(json.dumps({"fingerprint": self.chain, "result": result}, indent=1, default=str) + "\n")
        return result


def _clip_stage(directory: Path, world: World, config: CLIPTrainConfig, seed: int, progress: bool) -> dict:
    tokenizer_dir = directory / "sd" / "tokenizer"
    clip, processor = train_clip(world, config, seed, tokenizer_dir, progress)
    tokenizer = char_tokenizer(tokenizer_dir)
    save_clip(clip, processor, tokenizer, directory / "clip", directory / "sd" / "text_encoder", tokenizer_dir)
    return {"train": clip_accuracy(clip, processor, tokenizer, world, world.train_scenes),
            "heldout": clip_accuracy(clip, processor, tokenizer, world, world.heldout_scenes)}


def _diffusion_stage(directory: Path, world: World, config: DiffusionConfig, seed: int, progress: bool) -> dict:
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(directory / "sd" / "text_encoder").eval()
    tokenizer = char_tokenizer(directory / "sd" / "tokenizer")
    return build_diffusion(directory / "sd", text_encoder, tokenizer, world, config, seed, progress)


def _adapter_stage(directory: Path, world: World, config: PocketConfig, progress: bool) -> dict:
    _model_args(directory, config.clip, config.adapters).save(directory)
    paths, captions = _write_corpus(directory, world, config.seed)
    with tempfile.TemporaryDirectory(prefix="pocket-") as work:
        result = {"adapters": _train_adapters(directory, world, config.adapters, config.seed, Path(work), progress),
                  "decision": _train_decision(directory, world, config.adapters, config.seed, Path(work), progress)}
    _embed_corpus(directory, paths, captions)
    return result


def make_pocket(directory: str | Path, config: PocketConfig = PocketConfig(), progress: bool = True) -> Path:
    """Build the pocket checkpoint into ``directory`` (created; stages already built there with the same
    configuration are kept, see :class:`_Stages`). Returns it."""
    from gill.integrity import write_checksums

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seed = config.seed
    torch.manual_seed(seed)
    world = World(seed)
    stages = _Stages(directory, seed)
    report: dict[str, Any] = {"seed": seed, "heldout_scenes": [s.caption for s in world.heldout_scenes]}
    report["lm_loss"] = stages.run("lm", config.lm, lambda: train_lm(directory / "lm", world, config.lm, seed,
                                                                      progress))
    report["clip_top1"] = stages.run("clip", config.clip,
                                     lambda: _clip_stage(directory, world, config.clip, seed, progress))
    report["diffusion"] = stages.run("diffusion", config.diffusion,
                                     lambda: _diffusion_stage(directory, world, config.diffusion, seed, progress))
    report.update(stages.run("adapters", config.adapters,
                             lambda: _adapter_stage(directory, world, config, progress)))
    (directory / POCKET_INFO_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_checksums(directory)
    return directory
