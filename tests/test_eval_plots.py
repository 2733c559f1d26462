"""grid.png of `gill eval vist`: context photos, generated images and the truth per story, drawn with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gill.errors import InputError
from gill.evaluation.datasets import ImageFolder, read_vist_sis, squash, write_vist_fixture
from gill.evaluation.plots import CELL, HEADER, LABEL, grid_size, image_grid, vist_grid

CONTEXTS = ("captions-images", "caption")
COLOURS = {"captions-images": (250, 0, 0), "caption": (0, 0, 250)}


@pytest.fixture
def run(tmp_path) -> tuple:
    """The fixture split (3 stories, the last lacks a photo), records of a run over its 2 usable stories in two
    contexts, and the generated images on disk as `gill eval vist` leaves them; the second story's `caption`
    image did not come back."""
    sis = write_vist_fixture(tmp_path / "vist", stories=3, missing=1)
    split = read_vist_sis(sis)
    generated = tmp_path / "out" / "generated"
    records = []
    for context in CONTEXTS:
        (generated / context).mkdir(parents=True)
        for number, story in enumerate(split.stories[:2]):
            record = {"context": context, "story_id": story.story_id, "target": story.image_ids[-1]}
            if context == "caption" and number == 1:  # left over from an earlier run: must not be shown
                Image.new("RGB", (64, 64), (0, 250, 0)).save(generated / context / f"{story.image_ids[-1]}.png")
                record["error"] = "no image generated"
            else:
                Image.new("RGB", (64, 64), COLOURS[context]).save(generated / context / f"{story.image_ids[-1]}.png")
                record["clip_similarity"] = 0.5
            records.append(record)
    return split, ImageFolder(sis.parent / "val_images"), records, generated


def cell(grid: Image.Image, row: int, column: int) -> np.ndarray:
    top = HEADER + row * (LABEL + CELL) + LABEL
    return np.asarray(grid)[top:top + CELL, column * CELL:(column + 1) * CELL]


def test_vist_grid_rows_and_columns(run):
    split, folder, records, generated = run
    grid = vist_grid(split, folder, records, CONTEXTS, generated)
    # 2 stories x (4 context photos + 2 generated + truth), 128 px cells, a title band and a label per row.
    assert grid.size == grid_size(7, 2) == (7 * 128, 20 + 2 * (16 + 128)) == (896, 308)
    for row, story in enumerate(split.stories[:2]):
        photos = [squash(folder.load(image_id)).resize((CELL, CELL)) for image_id in story.image_ids]
        for column in range(4):
            assert np.array_equal(cell(grid, row, column), np.asarray(photos[column]))
        assert np.array_equal(cell(grid, row, 6), np.asarray(photos[4]))  # the truth, last
        assert (cell(grid, row, 4) == COLOURS["captions-images"]).all()
    assert (cell(grid, 0, 5) == COLOURS["caption"]).all()
    missing = cell(grid, 1, 5)  # not generated: a grey cell, never a stale file
    assert (missing[-20:-2, -20:-2] == (200, 200, 200)).all()


def test_vist_grid_limits_and_errors(run):
    split, folder, records, generated = run
    assert vist_grid(split, folder, records, CONTEXTS, generated, stories=1).size == grid_size(7, 1)
    assert vist_grid(split, folder, records, CONTEXTS, generated, stories=0) is None
    assert vist_grid(split, folder, [], CONTEXTS, generated) is None
    with pytest.raises(InputError, match="grid-stories"):
        vist_grid(split, folder, records, CONTEXTS, generated, stories=-1)
    with pytest.raises(InputError, match="one per column"):
        image_grid(["a", "b"], [("row", [None])])

