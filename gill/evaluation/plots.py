"""Pictures of an eval run, drawn with PIL only (no plotting dependency).

:func:`vist_grid`: for the first stories of a ``gill eval vist`` run, one row each: the four context photos, the
image generated under each context setting, and the ground-truth 5th photo, under a line naming the story (and the
CLIP similarity of each generated image). Saved as ``grid.png`` in the run's output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from gill.errors import InputError
from gill.evaluation.datasets import ImageFolder, VistSplit, squash

GRID_FILE = "grid.png"
CELL = 128  # pixels per image, square
HEADER = 20  # the band of column titles at the top
LABEL = 16  # the band naming the story above each row
_BACKGROUND = (255, 255, 255)
_EMPTY = (200, 200, 200)  # a cell whose image is missing (not generated, or not on disk)
_TEXT = (0, 0, 0)


def grid_size(columns: int, rows: int, cell: int = CELL) -> tuple[int, int]:
    """``(width, height)`` in pixels of a grid of ``rows`` x ``columns`` cells."""
    return columns * cell, HEADER + rows * (LABEL + cell)


def image_grid(headers: Sequence[str], rows: Sequence[tuple[str, Sequence[Image.Image | None]]],
               cell: int = CELL) -> Image.Image:
    """An RGB grid: ``headers`` over the columns, then per row its label and its images, each resized to
    ``cell`` x ``cell`` (a None image is drawn as a grey cell marked "none")."""
    if cell < 16:
        raise InputError(f"cell={cell}: give at least 16 pixels")
    if any(len(images) != len(headers) for _, images in rows):
        raise InputError(f"every row needs {len(headers)} images, one per column")
    font = ImageFont.load_default()
    grid = Image.new("RGB", grid_size(len(headers), len(rows), cell), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, header in enumerate(headers):
        draw.text((column * cell + 3, 4), header, fill=_TEXT, font=font)
    for row, (label, images) in enumerate(rows):
        top = HEADER + row * (LABEL + cell)
        draw.text((3, top + 2), label, fill=_TEXT, font=font)
        for column, image in enumerate(images):
            box = (column * cell, top + LABEL)
            if image is None:
                draw.rectangle((*box, box[0] + cell - 1, box[1] + cell - 1), fill=_EMPTY, outline=_BACKGROUND)
                draw.text((box[0] + 4, box[1] + cell // 2 - 6), "none", fill=_TEXT, font=font)
            else:
                grid.paste(image.convert("RGB").resize((cell, cell)), box)
    return grid


def vist_grid(split: VistSplit, folder: ImageFolder, records: Sequence[dict[str, Any]], contexts: Sequence[str],
              generated_dir: Path, stories: int = 8, squash_size: int = 224, cell: int = CELL) -> Image.Image | None:
    """The grid of the first ``stories`` evaluated stories (in the order of ``records``, the ``stories`` list of
    :func:`~gill.evaluation.vist.evaluate_vist`); generated images are read from
    ``generated_dir/<context>/<target photo id>.png``. None when no story was evaluated or ``stories`` is 0."""
    if stories < 0:
        raise InputError(f"--grid-stories {stories}: give 0 (no grid) or more")
    by_id = {story.story_id: story for story in split.stories}
    order = list(dict.fromkeys(record["story_id"] for record in records))[:stories]
    if not order:
        return None
    scored = {(record["story_id"], record["context"]): record for record in records}
    headers = ["context 1", "context 2", "context 3", "context 4", *[f"gen: {c}" for c in contexts], "truth"]
    rows = []
    for story_id in order:
        story = by_id[story_id]
        photos = [folder.load(image_id) for image_id in story.image_ids]
        photos = [squash(photo, squash_size) if photo is not None else None for photo in photos]
        generated, scores = [], []
        for context in contexts:
            record = scored.get((story_id, context), {})
            path = generated_dir / context / f"{story.image_ids[-1]}.png"
            ok = "clip_similarity" in record and path.is_file()
            generated.append(Image.open(path).convert("RGB") if ok else None)
            scores.append(f"{record['clip_similarity']:.2f}" if ok else "-")
        label = f"story {story_id}  CLIP sim " + " / ".join(scores)
        rows.append((label, [*photos[:4], *generated, photos[-1]]))
    return image_grid(headers, rows, cell)
