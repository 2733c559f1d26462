"""The gill.v1 wire contract and its conversions (fast: no model, no server)."""

from __future__ import annotations

import dataclasses
import io
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from gill import protocol
from gill.errors import InputError
from gill.events import DiffusionPreview, Done, ImageRequest, ImageResult, TextDelta
from gill.images import load_image
from gill.limits import Limits
from gill.options import GenerationOptions
from gill.protocol import (
    error_event,
    event_to_proto,
    options_from_request,
    parts_from_request,
    request_from_bytes,
)
from gill_client.v1 import dialogue_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


def _png(color: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _user(*parts: pb.Part) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=list(parts))


def _assistant(*parts: pb.Part) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, parts=list(parts))


def _text(text: str) -> pb.Part:
    return pb.Part(text=text)


def _image(data: bytes, mime_type: str = "image/png") -> pb.Part:
    return pb.Part(image=pb.Image(data=data, mime_type=mime_type))


def _request(*messages: pb.Message, **options: Any) -> pb.ChatRequest:
    request = pb.ChatRequest(messages=list(messages), request_id="r-1")
    if options:
        request.options.CopyFrom(pb.Options(**options))
    return request


# --- requests -----------------------------------------------------------------------------------------


def test_round_trip_text_and_images() -> None:
    png = _png()
    request = _request(
        _user(_image(png), _text("What is this?")),
        _assistant(_text("A red square.")),
        _user(_text("Show me another"), _image(_png((0, 0, 255)), mime_type="")),
    )
    decoded = request_from_bytes(request.SerializeToString())
    assert decoded == request
    assert decoded.request_id == "r-1"
    parts = parts_from_request(decoded)
    assert parts == [png, "Q: What is this?\nA:", " A red square.\n", "Q: Show me another\nA:", _png((0, 0, 255))]
    assert all(isinstance(part, (str, bytes)) for part in parts)
    # image parts are what the pipeline's image loader accepts
    assert load_image(parts[0]).size == (8, 6)


def test_raw_text_sends_every_text_part_as_written_with_images_in_place() -> None:
    first, second = _png(), _png((0, 0, 255))
    conversation = (_user(_text("a red square."), _image(first), _text("then a blue one.")),
                    _assistant(_text("ok")),
                    _user(_image(second), _text("the third:")))
    raw = request_from_bytes(_request(*conversation, raw_text=True).SerializeToString())
    assert parts_from_request(raw) == ["a red square.", first, "then a blue one.", "ok", second, "the third:"]
    wrapped = ["Q: a red square.\nA:", first, "Q: then a blue one.\nA:", " ok\n", second, "Q: the third:\nA:"]
    assert parts_from_request(_request(*conversation, raw_text=False)) == wrapped  # false: the dialogue format
    assert parts_from_request(_request(*conversation)) == wrapped  # unset (an older client): the dialogue format
    assert parts_from_request(_request(*conversation, seed=1)) == wrapped  # options without raw_text


def test_raw_text_keeps_every_check() -> None:
    with pytest.raises(InputError, match="is from the assistant"):
        parts_from_request(_request(_user(_text("a")), _assistant(_text("b")), raw_text=True))
    with pytest.raises(InputError, match="message 0 part 1 is empty"):
        parts_from_request(_request(_user(_text("a"), pb.Part()), raw_text=True))
    with pytest.raises(InputError, match="limit max_images_per_request"):
        parts_from_request(_request(_user(_image(_png()), _image(_png()), _text("a")), raw_text=True),
                           Limits(max_images_per_request=1))
    with pytest.raises(InputError, match="limit max_text_chars"):
        parts_from_request(_request(_user(_text("x" * 11)), raw_text=True), Limits(max_text_chars=10))


def test_raw_text_is_not_a_generation_option() -> None:
    request = _request(_user(_text("hi")), raw_text=True, seed=3, max_new_tokens=2)
    assert options_from_request(request_from_bytes(request.SerializeToString())) == GenerationOptions(
        seed=3, max_new_tokens=2)
    assert options_from_request(_request(_user(_text("hi")), raw_text=True)) == GenerationOptions()


def test_request_accepts_bytearray_and_memoryview() -> None:
    data = _request(_user(_text("hi"))).SerializeToString()
    assert request_from_bytes(bytearray(data)) == request_from_bytes(memoryview(data))


def test_undecodable_bytes_rejected() -> None:
    with pytest.raises(InputError, match="not a valid gill.v1.ChatRequest"):
        request_from_bytes(b"\xff\xff\xff")


def test_non_bytes_rejected() -> None:
    with pytest.raises(InputError, match="serialized gill.v1.ChatRequest bytes"):
        request_from_bytes("hello")  # type: ignore[arg-type]


def test_oversized_request_rejected() -> None:
    data = _request(_user(_image(b"x" * 2000))).SerializeToString()
    with pytest.raises(InputError, match=r"this server allows at most 1000 \(limit max_request_bytes"):
        request_from_bytes(data, Limits(max_request_bytes=1000))
    assert request_from_bytes(data) == pb.ChatRequest.FromString(data)  # the default limit: 64 MiB


def test_max_request_bytes_is_64_mib() -> None:
    assert Limits().max_request_bytes == 64 * 1024 * 1024


def test_unknown_role_rejected() -> None:
    request = _request(_user(_text("hi")))
    request.messages[0].role = pb.Role.ValueType(7)  # proto3 enums are open: the number survives the wire
    data = request.SerializeToString()
    assert pb.ChatRequest.FromString(data).messages[0].role == 7
    with pytest.raises(InputError, match=r"message 0 has unknown role 7.*ROLE_USER"):
        request_from_bytes(data)
    with pytest.raises(InputError, match="unknown role 7"):
        parts_from_request(request)


def test_unspecified_role_rejected() -> None:
    request = _request(pb.Message(parts=[_text("hi")]))
    with pytest.raises(InputError, match="message 0 has no role"):
        request_from_bytes(request.SerializeToString())
    with pytest.raises(InputError, match="message 0 has no role"):
        parts_from_request(request)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(), "no messages"),
        (_request(_user()), "message 0 has no parts"),
        (_request(_user(_text("a")), _assistant(_text("b"))), "must end with a user message"),
        (_request(_user(pb.Part())), "message 0 part 0 is empty"),
        (_request(_user(_text("a"), _image(b""))), "message 0 part 1: image has no data"),
        (_request(_assistant(_text("a")), _user(_image(_png(), "text/plain"))),
         r"message 1 part 0: mime_type 'text/plain' is not an image type"),
    ],
    ids=["no-messages", "no-parts", "last-not-user", "empty-part", "empty-image", "bad-mime"],
)
def test_rejections(request_: pb.ChatRequest, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parts_from_request(request_)


def test_too_many_messages() -> None:
    limit = Limits().max_messages
    messages = [_user(_text("x")) for _ in range(limit + 1)]
    with pytest.raises(InputError, match=f"{limit + 1} messages; this server allows at most {limit}"):
        parts_from_request(_request(*messages))
    assert len(parts_from_request(_request(*messages[:limit]))) == limit


def test_too_many_parts() -> None:
    limit = Limits().max_parts
    texts = [_text("x")] * (limit + 1)
    with pytest.raises(InputError, match=f"{limit + 1} parts .* at most {limit}"):
        parts_from_request(_request(_user(*texts)))


def test_too_many_images() -> None:
    limit = Limits().max_images_per_request
    images = [_image(_png())] * (limit + 1)
    with pytest.raises(InputError, match=f"this server allows at most {limit} \\(limit max_images_per_request\\)"):
        parts_from_request(_request(_user(*images)))
    assert len(parts_from_request(_request(_user(*images[1:])))) == limit


# --- options ------------------------------------------------------------------------------------------


def test_options_unset_are_defaults() -> None:
    assert options_from_request(_request(_user(_text("hi")))) == GenerationOptions()
    request = _request(_user(_text("hi")))
    request.options.SetInParent()  # present but empty: still every default
    assert request.HasField("options")
    assert options_from_request(request) == GenerationOptions()
    defaults = GenerationOptions(max_new_tokens=64, guidance_scale=3.0)
    assert options_from_request(request, defaults) == defaults


def test_options_set_override_only_those() -> None:
    defaults = GenerationOptions(max_new_tokens=64, guidance_scale=3.0)
    request = _request(_user(_text("hi")), temperature=0.7, top_p=0.9, seed=2**63 - 1, max_images=0,
                       allow_generation=False, preview_every=5, min_word_tokens=0)
    options = options_from_request(request_from_bytes(request.SerializeToString()), defaults)
    assert options == dataclasses.replace(defaults, temperature=0.7, top_p=0.9, seed=2**63 - 1, max_images=0,
                                          allow_generation=False, preview_every=5)
    assert options.max_new_tokens == 64 and options.guidance_scale == 3.0  # unset: the defaults


def test_options_zero_values_are_set_not_unset() -> None:
    # HasField: an explicit 0 / False overrides a non-zero default
    request = _request(_user(_text("hi")), max_images=0, allow_retrieval=False, seed=0)
    options = options_from_request(request, GenerationOptions(max_images=3, seed=9))
    assert (options.max_images, options.allow_retrieval, options.seed) == (0, False, 0)


def test_options_fields_match_generation_options() -> None:
    known = {field.name for field in dataclasses.fields(GenerationOptions)}
    wire = {field.name for field in pb.Options.DESCRIPTOR.fields}
    assert wire - protocol.PROMPT_OPTIONS <= known
    assert protocol.PROMPT_OPTIONS <= wire and not protocol.PROMPT_OPTIONS & known  # read by parts_from_request
    assert pb.Options.DESCRIPTOR.fields_by_name["seed"].type == pb.Options.DESCRIPTOR.fields_by_name["seed"].TYPE_UINT64


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": math.nan}, "temperature=nan"),
        ({"top_p": 0.5}, "top_p must be 1 with temperature 0"),
        ({"seed": 2**63}, "seed="),
        ({"seed": 2**64 - 1}, "seed="),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": -5}, "max_new_tokens=-5"),
        ({"num_inference_steps": 10_000}, "num_inference_steps=10000 .*limit max_denoising_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"max_new_tokens": 2**31 - 1}, "max_new_tokens=2147483647 .*limit max_new_tokens"),
        ({"max_images": 9}, "max_images=9 .*limit max_images"),
        ({"guidance_scale": math.inf}, "guidance_scale=inf"),
        ({"preview_every": -1}, "preview_every=-1"),
    ],
)
def test_options_out_of_range(options: dict[str, Any], message: str) -> None:
    request = _request(_user(_text("hi")), **options)
    with pytest.raises(InputError, match=message):
        options_from_request(request_from_bytes(request.SerializeToString()))


# --- events -------------------------------------------------------------------------------------------


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_text_delta_event() -> None:
    event = event_to_proto(TextDelta("héllo"))
    assert event is not None and event.WhichOneof("event") == "text"
    assert event.text.text == "héllo"


def test_image_result_retrieved() -> None:
    image = Image.new("RGB", (10, 7), (1, 2, 3))
    event = event_to_proto(ImageResult(2, "retrieved", image, "ret", (0.25, 0.75), 12.5, "http://x/a.jpg", "a cat"))
    assert event is not None and event.WhichOneof("event") == "image"
    shown = pb.ChatEvent.FromString(event.SerializeToString()).image
    assert shown.index == 2
    assert shown.source == pb.IMAGE_SOURCE_RETRIEVED and shown.decision == pb.DECISION_RETRIEVE
    assert (shown.url, shown.caption) == ("http://x/a.jpg", "a cat")
    assert shown.HasField("score") and shown.score == pytest.approx(12.5)
    assert (shown.p_generate, shown.p_retrieve) == pytest.approx((0.25, 0.75))
    decoded = _decoded(shown.png)
    assert decoded.size == (10, 7) and decoded.convert("RGB").getpixel((0, 0)) == (1, 2, 3)


def test_image_result_generated_without_optionals() -> None:
    image = Image.new("RGBA", (4, 4), (9, 9, 9, 128))
    event = event_to_proto(ImageResult(0, "generated", image, "gen", None))
    assert event is not None
    shown = event.image
    assert shown.source == pb.IMAGE_SOURCE_GENERATED and shown.decision == pb.DECISION_GENERATE
    assert not shown.HasField("score")
    assert not shown.HasField("p_generate") and not shown.HasField("p_retrieve")
    assert shown.url == "" and shown.caption == ""
    assert _decoded(shown.png).mode == "RGBA"


def test_image_in_mode_png_cannot_hold_is_converted() -> None:
    event = event_to_proto(ImageResult(0, "generated", Image.new("CMYK", (3, 3)), "gen", None, 0.5))
    assert event is not None
    assert _decoded(event.image.png).mode == "RGB"


def test_diffusion_preview_event() -> None:
    event = event_to_proto(DiffusionPreview(1, 10, 50, Image.new("RGB", (16, 16), (0, 255, 0))))
    assert event is not None and event.WhichOneof("event") == "preview"
    preview = event.preview
    assert (preview.index, preview.step, preview.total_steps) == (1, 10, 50)
    assert _decoded(preview.png).size == (16, 16)


def test_done_event() -> None:
    timings = {"prompt_s": 0.01, "total_s": 1.5}
    event = event_to_proto(Done("a red square", 12, 5, "newline", timings))
    assert event is not None and event.WhichOneof("event") == "done"
    done = pb.ChatEvent.FromString(event.SerializeToString()).done
    assert (done.text, done.prompt_tokens, done.generated_tokens, done.stop_reason) == ("a red square", 12, 5,
                                                                                         "newline")
    assert dict(done.timings) == timings  # doubles: exact


def test_image_request_is_not_sent() -> None:
    assert event_to_proto(ImageRequest(0, torch.zeros(8, 4))) is None


def test_unknown_event_type_rejected() -> None:
    with pytest.raises(TypeError, match="not a pipeline event"):
        event_to_proto("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "invalid_argument", "ERROR_CODE_INVALID_ARGUMENT"])
def test_error_event(code: str) -> None:
    event = error_event(code, "max_new_tokens=0 (allowed: an integer >= 1)")
    assert event.WhichOneof("event") == "error"
    assert event.error.code == pb.ERROR_CODE_INVALID_ARGUMENT
    assert event.error.message.startswith("max_new_tokens=0")


def test_error_event_every_code() -> None:
    for name in ("RESOURCE_EXHAUSTED", "CANCELLED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"):
        assert pb.ErrorCode.Name(error_event(name, "x").error.code) == f"ERROR_CODE_{name}"


@pytest.mark.parametrize("code", ["NOT_FOUND", "UNSPECIFIED", ""])
def test_error_event_unknown_code(code: str) -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        error_event(code, "x")


# --- the contract itself ------------------------------------------------------------------------------


def test_enums_start_unspecified_and_are_prefixed() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(enum.name)).upper() + "_"
        assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
        assert all(value.name.startswith(prefix) for value in enum.values)


def test_every_option_is_optional() -> None:
    assert all(field.has_presence for field in pb.Options.DESCRIPTOR.fields)


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_check_reports_stale_and_missing_files(tmp_path: Path) -> None:
    package = tmp_path / "gill_client" / "v1"
    package.mkdir(parents=True)
    (package / "dialogue_pb2.py").write_text((REPO / "client" / "src" / "gill_client" / "v1" / "dialogue_pb2.py")
                                             .read_text() + "# edited\n")
    (package / "old_pb2.py").write_text("")
    result = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "gill_client/v1/dialogue_pb2.py (differs)" in result.stderr
    assert "gill_client/v1/dialogue_pb2.pyi (missing)" in result.stderr
    assert "gill_client/v1/old_pb2.py (no .proto generates it)" in result.stderr


def test_images_retrieved_earlier_are_reported_as_shown() -> None:
    request = pb.ChatRequest(messages=[
        pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="show me")]),
        pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(image=pb.Image(data=b"x", corpus_id=7)),
                                                  pb.Part(image=pb.Image(data=b"y"))]),
        pb.Message(role=pb.ROLE_USER, parts=[pb.Part(image=pb.Image(data=b"z", corpus_id=0)), pb.Part(text="more")]),
    ])
    assert protocol.shown_corpus_ids(request) == frozenset({7, 0})
    retrieved = event_to_proto(ImageResult(0, "retrieved", Image.new("RGB", (2, 2)), "ret", None, 1.0, "u", None, 5))
    assert retrieved.image.corpus_id == 5
    assert not event_to_proto(ImageResult(0, "generated", Image.new("RGB", (2, 2)), "gen", None)).image.HasField(
        "corpus_id")
