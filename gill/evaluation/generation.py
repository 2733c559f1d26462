"""What every image-generation eval shares: the reference's forced generation, the in-process generator, and the
per-setting scoring of generated images against their targets (CLIP similarity, LPIPS).

Forced generation is the reference's ``num_words=2, gen_scale_factor=1e5`` (``evals/generate_vist_images.py``,
``evals/generate_visdial_images.py``): the ``[IMG0]`` logit is scaled so far up that it is always chosen, and the
image is generated whatever the decision head says (the reference evaluates without retrieval embeddings, so it
always generates; here retrieval is switched off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from gill.options import GenerationOptions

# parts, options -> the generated image or None (no image came back)
Generate = Callable[[list[str | Image.Image], GenerationOptions], Image.Image | None]


def forced_generation_options(seed: int, guidance_scale: float, num_inference_steps: int, scheduler: str
                              ) -> GenerationOptions:
    """The options of one forced generation (``max_new_tokens=2``, ``gen_scale_factor=1e5``, retrieval off);
    raises :class:`~gill.errors.InputError` on a bad value."""
    return GenerationOptions(max_new_tokens=2, gen_scale_factor=1e5, max_images=1, allow_retrieval=False,
                             seed=seed, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                             scheduler=scheduler)


def pipeline_generator(pipeline) -> Generate:
    """In-process generation with a :class:`gill.pipeline.Pipeline`: the first generated image of the turn."""
    from gill.events import ImageResult

    def generate(parts: list[str | Image.Image], options: GenerationOptions) -> Image.Image | None:
        for event in pipeline.stream(parts, options):
            if isinstance(event, ImageResult) and event.source == "generated":
                return event.image
        return None

    return generate


class PairScores:
    """One setting's scores: each generated image against its target, by CLIP similarity and (optionally) LPIPS.

    ``clip`` is a :class:`~gill.evaluation.metrics.ClipSimilarity`, ``lpips`` an
    :class:`~gill.evaluation.metrics.Lpips` or None (not computed); generated images are saved as
    ``directory/<name>.png`` when ``directory`` is given.
    """

    def __init__(self, clip, lpips, directory: Path | None = None) -> None:
        self.clip, self.lpips, self.directory = clip, lpips, directory
        self.clip_values: list[float] = []
        self.lpips_values: list[float] = []
        self.no_image = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict[str, Any], name: str, generated: Image.Image | None, target: Image.Image
            ) -> dict[str, Any]:
        """Score one pair into ``record`` (``clip_similarity``, ``lpips``; or ``error`` when no image came back)
        and return it."""
        if generated is None:
            self.no_image += 1
            record["error"] = "no image generated"
            return record
        if self.directory is not None:
            generated.save(self.directory / f"{name}.png")
        record["clip_similarity"] = float(self.clip([generated], [target])[0])
        self.clip_values.append(record["clip_similarity"])
        if self.lpips is not None:
            record["lpips"] = float(self.lpips([generated], [target])[0])
            self.lpips_values.append(record["lpips"])
        return record

    def result(self) -> dict[str, Any]:
        """``clip_similarity`` and ``lpips`` summaries (mean, std, sem, n), ``scored`` and ``no_image`` counts."""
        from gill.evaluation.report import summary

        return {"clip_similarity": summary(self.clip_values),
                "lpips": summary(self.lpips_values) if self.lpips is not None else None,
                "scored": len(self.clip_values), "no_image": self.no_image}


def load_metrics(clip_directory: Path, lpips_alexnet: Path | None, device: str | None):
    """The CLIP similarity model and, when an AlexNet file is given, LPIPS (else None), from local weights."""
    from gill.evaluation.metrics import ClipSimilarity, Lpips

    clip = ClipSimilarity.from_directory(clip_directory, device)
    return clip, Lpips.from_alexnet(lpips_alexnet, device) if lpips_alexnet is not None else None


def metrics_section(clip, lpips) -> dict[str, Any]:
    """The result's ``metrics`` (each model's identity) and ``notes`` on what is not comparable to the paper."""
    notes = []
    if lpips is None:
        notes.append("LPIPS not computed: give --lpips-alexnet (torchvision's alexnet-owt-7be5be79.pth)")
    elif not lpips.describe()["alexnet_is_torchvision_imagenet"]:
        notes.append("LPIPS trunk is not torchvision's ImageNet AlexNet: LPIPS not comparable to the paper")
    return {"metrics": {"clip_similarity": clip.describe(), "lpips": lpips.describe() if lpips is not None else None},
            "notes": notes}
