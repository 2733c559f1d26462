"""Every entry of tests/bad_inputs.py against the served ``gill`` model: a typed INVALID_ARGUMENT error with a
message that says what was wrong (never INTERNAL), or a turn that works; either way the server serves the
next turn.

``GILL_RELIABILITY_TABLE=docs/reliability-bad-input.md pytest tests/test_bad_input.py`` also writes the
outcomes as the markdown table of docs/reliability.md.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import CATALOGUE, BadInput, exif_rotated
from PIL import Image
from wire import SERVED_LIMITS, events, kinds, metric, raw_events, request, user

from gill.images import load_image
from gill_client.v1 import dialogue_pb2 as pb

FOLLOW_UP = request(user("hello"), max_new_tokens=2, max_images=0)
_outcomes: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def reliability_table():
    """Write the outcomes collected by the module's tests to $GILL_RELIABILITY_TABLE, when it is set."""
    yield
    path = os.environ.get("GILL_RELIABILITY_TABLE")
    if path and _outcomes:
        rows = [f"| {case.group} | {_cell(case.name)} | {_cell(_outcomes[case.name])} |"
                for case in CATALOGUE if case.name in _outcomes]
        Path(path).write_text("| | input | outcome |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_bad_input_gets_a_typed_error_or_works_and_the_server_keeps_serving(server, case: BadInput):
    internal_before = metric(server, "gill_turns_total", outcome="error")
    stream = raw_events(server, case.build())
    names = kinds(stream)
    if case.expect is None:
        assert names and names[-1] == "done" and "error" not in names, stream
        done = stream[-1].done
        _outcomes[case.name] = f"works: done, {done.generated_tokens} tokens ({done.stop_reason})"
    else:
        assert names == ["error"], stream
        error = stream[0].error
        assert error.code == pb.ERROR_CODE_INVALID_ARGUMENT, error
        assert case.expect in error.message
        _outcomes[case.name] = f"`INVALID_ARGUMENT`: {error.message}"
    assert metric(server, "gill_turns_total", outcome="error") == internal_before  # no INTERNAL turn
    assert kinds(events(server, FOLLOW_UP))[-1] == "done"


def test_every_bullet_of_the_issue_is_in_the_catalogue():
    limits = SERVED_LIMITS
    names = " ".join(case.name for case in CATALOGUE)
    for needed in ("not protobuf", "unknown role", "empty request", "no parts", "bytes (test server limit",
                   "zero-byte image", "not an image", "truncated", "decompression bomb", "CMYK", "palette",
                   "16-bit", "animated", "EXIF-rotated", "invalid UTF-8", "control characters", "context longer",
                   "temperature NaN", "temperature -1", "top_p 0", "top_p 1.5", "max_new_tokens 2**31",
                   "num_inference_steps 0", "num_inference_steps 2**31", f"{limits.max_images_per_request + 1} images"):
        assert needed in names, needed
    assert len({case.name for case in CATALOGUE}) == len(CATALOGUE)


def test_exif_rotated_image_decodes_to_the_physically_rotated_pixels():
    upright = Image.effect_noise((40, 24), 60).convert("RGB")
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG")
    # PNG keeps EXIF too (eXIf chunk) and is lossless, so the pixels must match exactly.
    loaded = load_image(exif_rotated(upright, "PNG"))
    assert loaded.size == (40, 24)
    assert np.array_equal(np.asarray(loaded), np.asarray(load_image(buffer.getvalue())))
    # A JPEG from a phone: the tag is applied, so a smooth picture comes back upright up to JPEG loss (a wrong
    # turn would put the red gradient on the wrong axis).
    x, y = np.meshgrid(np.linspace(0, 255, 160), np.linspace(0, 255, 96))
    gradient = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))
    photo = np.asarray(load_image(exif_rotated(gradient, "JPEG")), dtype=np.float32)
    assert photo.shape == (96, 160, 3)
    assert np.abs(photo - np.asarray(gradient, dtype=np.float32)).mean() < 3
