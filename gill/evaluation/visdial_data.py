"""VisDial v1.0 (Das et al. 2017) in its official format, its images on disk, and a synthetic fixture.

The official file is ``visdial_1.0_val.json`` (visualdialog.org). Its shape, which :func:`read_visdial` checks::

    {"version": "1.0", "split": "val",
     "data": {"questions": ["is the photo in color", ...], "answers": ["yes", ...],
              "dialogs": [{"image_id": 185565, "caption": "a man riding a wave on a surfboard",
                           "dialog": [{"question": 12, "answer": 7, "answer_options": [...], "gt_index": 3},
                                      ...]},  # 10 rounds in val
                          ...]}}

Rounds hold indices into the shared ``questions`` and ``answers`` lists (questions are stored without their
question mark). In the test split a dialog's last round has no ``answer``; such a round ends the dialog here.

Images are read from a folder by ``image_id``: the official ``VisualDialog_val2018_<12-digit id>.jpg`` (the
reference's layout, ``VisualDialog/VisualDialog_val2018/``), or ``<image_id>`` / ``<12-digit id>`` with any of
``.jpg .jpeg .png .webp .gif``. A missing or unreadable image is counted, never fatal.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from gill.errors import InputError
from gill.evaluation.datasets import IMAGE_EXTENSIONS, ImageFolder, read_json


@dataclass(frozen=True)
class VisdialDialog:
    image_id: int
    caption: str
    rounds: tuple[tuple[str, str], ...]  # (question, answer) in dialog order, question without its "?"

    @property
    def file_id(self) -> str:
        """The 12-digit zero-padded id of the official image file names (and of the reference's outputs)."""
        return f"{self.image_id:012d}"


@dataclass(frozen=True)
class VisdialSplit:
    path: Path
    version: str
    split: str  # "val", "test", "train" (what the file says)
    dialogs: tuple[VisdialDialog, ...]  # in file order


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"{path}: {message} (expected the official VisDial v1.0 format, e.g. visdial_1.0_val.json)")


def _index(path: Path, where: str, value: Any, pool: list, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{where} must be an integer index into data.{name}, got {value!r}")
    if not 0 <= value < len(pool):
        raise _fail(path, f"{where}={value} is out of range: data.{name} has {len(pool)} entries")
    return pool[value]


def read_visdial(path: str | Path) -> VisdialSplit:
    """Parse an official VisDial v1.0 JSON file; raises :class:`InputError` naming the file and the first
    malformed entry (by its JSON path, e.g. ``data.dialogs[3].dialog[2].question``)."""
    path = Path(path)
    data = read_json(path, "the VisDial dialogs, e.g. visdial_1.0_val.json from visdial_1.0_val.zip "
                           "(visualdialog.org)")
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise _fail(path, "no top-level object with a 'data' object")
    body = data["data"]
    for key in ("questions", "answers", "dialogs"):
        if not isinstance(body.get(key), list):
            raise _fail(path, f"data.{key} must be a list, got {type(body.get(key)).__name__}")
    questions, answers = body["questions"], body["answers"]
    dialogs = []
    for number, entry in enumerate(body["dialogs"]):
        where = f"data.dialogs[{number}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} must be an object")
        image_id = entry.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
            raise _fail(path, f"{where}.image_id must be a non-negative integer, got {image_id!r}")
        if not isinstance(entry.get("dialog"), list):
            raise _fail(path, f"{where}.dialog must be a list of rounds")
        rounds = []
        for turn, round_ in enumerate(entry["dialog"]):
            at = f"{where}.dialog[{turn}]"
            if not isinstance(round_, dict) or "question" not in round_:
                raise _fail(path, f"{at} must be an object with a 'question' index")
            if "answer" not in round_:  # the test split's last round: a question to answer, no answer
                if turn != len(entry["dialog"]) - 1:
                    raise _fail(path, f"{at} has no 'answer' but is not the dialog's last round")
                break
            rounds.append((str(_index(path, f"{at}.question", round_["question"], questions, "questions")),
                           str(_index(path, f"{at}.answer", round_["answer"], answers, "answers"))))
        dialogs.append(VisdialDialog(image_id, str(entry.get("caption", "")), tuple(rounds)))
    return VisdialSplit(path, str(data.get("version", "")), str(data.get("split", "")), tuple(dialogs))


class VisdialImages(ImageFolder):
    """A VisDial image folder (by ``image_id``); counts missing and unreadable images like :class:`ImageFolder`.

    Images are not kept in memory after :meth:`load` (a val split's 2,064 full-size COCO photos would be about
    2 GB); each dialog's image is loaded once per run."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        if not Path(root).is_dir():
            raise InputError(f"--images {root}: no such directory; it should hold the VisDial images, e.g. "
                             f"VisualDialog_{split or 'val'}2018/VisualDialog_{split or 'val'}2018_<12-digit id>.jpg")
        super().__init__(root)
        self.split = split or "val"

    def path(self, image_id: str) -> Path | None:
        padded = f"{int(image_id):012d}"
        names = [f"VisualDialog_{self.split}2018_{padded}.jpg"]
        names += [f"{stem}{extension}" for stem in dict.fromkeys((image_id, padded)) for extension in IMAGE_EXTENSIONS]
        for name in names:
            if (self.root / name).is_file():
                return self.root / name
        return None

    def load(self, image_id: str) -> Image.Image | None:
        image = super().load(image_id)
        self._cache.pop(image_id, None)
        return image


# Shapes-world dialogs: every question is answerable from the picture, as VisDial's are from the photo.
_QUESTIONS = ("what shape is it", "what colour is the shape", "what colour is the background", "is it a photo",
              "is there only one shape", "is the shape big", "is the shape in the middle", "are there people",
              "is it outdoors", "can you see any text")


def write_visdial_fixture(directory: str | Path, dialogs: int = 4, seed: int = 0, missing: int = 1,
                          unreadable: int = 0, image_size: int = 64) -> Path:
    """A synthetic VisDial v1.0 val split in the official format: ``<directory>/visdial_1.0_val.json`` and
    ``<directory>/VisualDialog_val2018/VisualDialog_val2018_<12-digit id>.jpg`` (shapes-world JPEGs, the
    reference's layout). Every dialog has 10 rounds with ``answer_options`` and ``gt_index``. Of the last dialogs,
    ``missing`` have no image on disk and the ``unreadable`` before them a corrupt file, so runs must count and
    skip them. Returns the JSON's path."""
    from gill.tiny import COLOURS, SHAPES, shape_image

    rng = random.Random(seed)
    root = Path(directory)
    image_dir = root / "VisualDialog_val2018"
    image_dir.mkdir(parents=True, exist_ok=True)
    questions = list(_QUESTIONS)
    answers: list[str] = []

    def answer_index(text: str) -> int:
        if text not in answers:
            answers.append(text)
        return answers.index(text)

    records = []
    for number in range(dialogs):
        image_id = 400_000 + 17 * number
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(list(COLOURS), 2)
        replies = (shape, colour, background, "no, a drawing", "yes", rng.choice(("yes", "no")), "yes", "no", "no",
                   "no")
        rounds = []
        for question, reply in enumerate(replies):
            truth = answer_index(reply)
            options = sorted({truth, *(answer_index(other) for other in ("yes", "no", "red", "circle"))})
            rounds.append({"question": question, "answer": truth, "answer_options": options,
                           "gt_index": options.index(truth)})
        records.append({"image_id": image_id, "caption": f"a {colour} {shape} on a {background} background",
                        "dialog": rounds})
        file = image_dir / f"VisualDialog_val2018_{image_id:012d}.jpg"
        if number >= dialogs - missing:
            continue
        if number >= dialogs - missing - unreadable:
            file.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
            continue
        shape_image(colour, shape, background, image_size).save(file, quality=95)
    data = {"version": "1.0", "split": "val",
            "data": {"questions": questions, "answers": answers, "dialogs": records}}
    path = root / "visdial_1.0_val.json"
    path.write_text(json.dumps(data, indent=1))
    return path
