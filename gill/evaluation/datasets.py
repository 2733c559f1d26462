"""VIST (Visual Storytelling, SIS tier) in its official format, images on disk, and a synthetic fixture.

The official file is ``sis/val.story-in-sequence.json`` from ``SIS-with-labels.tar.gz``
(visionandlanguage.net/VIST). Its shape, which :func:`read_vist_sis` checks::

    {"images": [{"id": "2627795780", "url_o": "https://farm4.staticflickr.com/...", ...}, ...],
     "annotations": [[{"story_id": "45530", "photo_flickr_id": "2627795780", "worker_arranged_photo_order": 0,
                       "text": "[female] went to the fair .", "original_text": "Mary went to the fair.", ...}],
                     ...]}

Every ``annotations`` entry is a one-element list holding one sentence of a story; a story's five sentences
share its ``story_id``. ``text`` is the normalised sentence, which the reference's eval scripts feed to the
model (``evals/download_vist_images.py``). Images are read from ``<images>/<photo_flickr_id>.png`` (the
reference's layout; ``.jpg``, ``.jpeg``, ``.gif`` and ``.webp`` are found too); a missing or unreadable image is
counted, never fatal.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gill.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
# The reference squashes every VIST image to 224x224 (no aspect ratio kept) when it downloads it
# (gill/utils.py get_image_from_url), so its inputs and ground truths are 224x224.
SQUASH_SIZE = 224


@dataclass(frozen=True)
class VistItem:
    """One sentence of a story and its photo."""

    image_id: str
    text: str  # the normalised sentence (what the reference feeds the model)
    original_text: str
    order: int  # worker_arranged_photo_order: the position in the story, 0-based


@dataclass(frozen=True)
class VistStory:
    story_id: str
    items: tuple[VistItem, ...]  # in story order

    @property
    def captions(self) -> list[str]:
        return [item.text for item in self.items]

    @property
    def image_ids(self) -> list[str]:
        return [item.image_id for item in self.items]


# Flickr size fields an ``images`` entry may carry, best first: ``url_o`` (the original, what the reference
# downloads) and the smaller renditions some entries have instead (``url_m`` is 500 px on the long side, still more
# than the 224x224 every eval squashes to).
URL_FIELDS = ("url_o", "url_l", "url_c", "url_z", "url_m")


@dataclass(frozen=True)
class VistSplit:
    """A split's stories (in file order) and the photos' URLs (``url_o``, as the reference downloads).

    ``image_url_options``: every URL of a photo among :data:`URL_FIELDS`, best first (``url_o`` when present).
    """

    path: Path
    stories: tuple[VistStory, ...]
    image_urls: dict[str, str] = field(repr=False)
    image_url_options: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def image_ids(self) -> list[str]:
        """Every photo the stories use, each once, in first-use order."""
        return list(dict.fromkeys(image_id for story in self.stories for image_id in story.image_ids))


def read_json(path: Path, what: str) -> object:
    """The parsed JSON of a dataset file; raises :class:`InputError` saying the file is missing (and that
    ``what`` is the file to give) or not readable JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from None


def read_vist_sis(path: str | Path) -> VistSplit:
    """Parse an official VIST SIS JSON file; raises :class:`InputError` naming the first malformed entry."""
    path = Path(path)
    data = read_json(path, "the SIS split, e.g. sis/val.story-in-sequence.json from SIS-with-labels.tar.gz")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected a JSON object with an 'annotations' list (the VIST SIS format)")
    stories: dict[str, list[VistItem]] = {}
    for index, entry in enumerate(data["annotations"]):
        if not (isinstance(entry, list) and len(entry) == 1 and isinstance(entry[0], dict)):
            raise InputError(f"{path}: annotations[{index}] must be a list of one object (the SIS format)")
        sentence = entry[0]
        missing = [key for key in ("story_id", "photo_flickr_id", "text", "worker_arranged_photo_order")
                   if key not in sentence]
        if missing:
            raise InputError(f"{path}: annotations[{index}] lacks {missing}")
        try:
            order = int(sentence["worker_arranged_photo_order"])
        except (TypeError, ValueError):
            raise InputError(f"{path}: annotations[{index}].worker_arranged_photo_order must be an integer, got "
                             f"{sentence['worker_arranged_photo_order']!r}") from None
        stories.setdefault(str(sentence["story_id"]), []).append(VistItem(
            str(sentence["photo_flickr_id"]), str(sentence["text"]),
            str(sentence.get("original_text", sentence["text"])), order))
    urls, options = {}, {}
    for image in data.get("images", []):
        if not (isinstance(image, dict) and "id" in image):
            continue
        if image.get("url_o"):
            urls[str(image["id"])] = str(image["url_o"])
        found = tuple(dict.fromkeys(str(image[key]) for key in URL_FIELDS if isinstance(image.get(key), str)
                                    and image[key]))
        if found:
            options[str(image["id"])] = found
    ordered = tuple(VistStory(story_id, tuple(sorted(items, key=lambda item: item.order)))
                    for story_id, items in stories.items())
    return VistSplit(path, ordered, urls, options)


def squash(image: Image.Image, size: int = SQUASH_SIZE) -> Image.Image:
    """``image`` resized to ``size`` x ``size`` without keeping its aspect ratio, RGB (the reference's download)."""
    return image.resize((size, size)).convert("RGB")


class ImageFolder:
    """Photos by id under one directory; counts what is missing or unreadable instead of failing."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"--images {self.root}: no such directory; it should hold <photo_flickr_id>.png files")
        self.problems: dict[str, str] = {}  # image id -> "missing" or "unreadable: why"
        self._cache: dict[str, Image.Image] = {}

    def path(self, image_id: str) -> Path | None:
        for extension in IMAGE_EXTENSIONS:
            candidate = self.root / f"{image_id}{extension}"
            if candidate.is_file():
                return candidate
        return None

    def load(self, image_id: str) -> Image.Image | None:
        """The photo as RGB, or None (recorded in :attr:`problems`) when it is missing or cannot be decoded."""
        from gill.images import load_image

        if image_id in self._cache:
            return self._cache[image_id]
        if image_id in self.problems:
            return None
        path = self.path(image_id)
        if path is None:
            self.problems[image_id] = "missing"
            return None
        try:
            image = load_image(path, what=str(path))
        except InputError as error:
            self.problems[image_id] = f"unreadable: {error}"
            return None
        self._cache[image_id] = image
        return image

    def summary(self) -> dict[str, int]:
        """``{"missing": n, "unreadable": m}`` over the images asked for so far."""
        counts = Counter(problem.split(":")[0] for problem in self.problems.values())
        return {"missing": counts.get("missing", 0), "unreadable": counts.get("unreadable", 0)}


def write_vist_fixture(directory: str | Path, stories: int = 4, seed: int = 0, missing: int = 1,
                       image_size: int = 64) -> Path:
    """A synthetic VIST SIS split in the official format: ``<directory>/sis/val.story-in-sequence.json`` and
    ``<directory>/sis/val_images/<id>.png`` (shapes-world images). The last ``missing`` stories each lack the
    photo of their third sentence on disk, so runs must count and skip them. Returns the JSON's path."""
    from gill.tiny import COLOURS, SHAPES, shape_image

    rng = random.Random(seed)
    root = Path(directory) / "sis"
    image_dir = root / "val_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    annotations, images = [], []
    photo = 1_000_000
    for story in range(stories):
        album = str(70_000 + story)
        shape = rng.choice(SHAPES)
        for order in range(5):  # a story: one shape, changing colours, in the same album
            colour, background = rng.sample(colours, 2)
            photo += 1
            image_id = str(photo)
            if not (story >= stories - missing and order == 2):
                shape_image(colour, shape, background, image_size).save(image_dir / f"{image_id}.png")
            images.append({"id": image_id, "album_id": album, "media": "photo", "license": "5", "secret": "0",
                           "title": "", "text": "", "tags": "", "datetaken": "2016-01-01 00:00:00",
                           "url_o": f"https://vist.invalid/{image_id}.png"})
            sentence = f"the {colour} {shape} sat on {background} ."
            annotations.append([{
                "story_id": str(50_000 + story), "storylet_id": str(250_000 + story * 5 + order),
                "album_id": album, "photo_flickr_id": image_id, "worker_arranged_photo_order": order,
                "setting": "last-story-type", "worker_id": "SYNTHETIC", "tier": "story-in-sequence",
                "text": sentence, "original_text": sentence.capitalize().replace(" .", "."),
            }])
    data = {"info": {"description": "synthetic VIST SIS fixture (gill.evaluation.datasets)"}, "type": "story",
            "albums": [{"id": str(70_000 + story)} for story in range(stories)], "images": images,
            "annotations": annotations}
    path = root / "val.story-in-sequence.json"
    path.write_text(json.dumps(data, indent=1))
    return path
