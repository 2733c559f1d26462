"""A catalogue of bad (and awkward but valid) inputs to the served ``gill`` model, one per row of
docs/reliability.md: how to build the raw REQUEST bytes, and what the server must answer.

``expect`` is a fragment of the ``ERROR_CODE_INVALID_ARGUMENT`` message, or None when the turn must simply work
(end in ``done``). Every valid request here is cheap: at most 2 new tokens and no images shown.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from wire import SERVED_LIMITS, request, user

from gill_client.v1 import dialogue_pb2 as pb

CHEAP = {"max_new_tokens": 2, "max_images": 0}
# The tiny checkpoint's LM window (tiny.py: max_position_embeddings).
TINY_WINDOW = 256


@dataclass(frozen=True)
class BadInput:
    group: str  # request, text, options or image
    name: str  # what was sent, as the table says it
    build: Callable[[], bytes]  # the REQUEST tensor's bytes
    expect: str | None  # a fragment of the INVALID_ARGUMENT message; None: the turn works


def _bytes(chat: pb.ChatRequest) -> bytes:
    return chat.SerializeToString()


def _chat(*parts, **options) -> Callable[[], bytes]:
    """A one-message user request with these parts (str or encoded image bytes) and options over CHEAP."""
    return lambda: _bytes(request(user(*parts), **{**CHEAP, **options}))


def _invalid_utf8(field: str) -> bytes:
    """A request whose ``field`` (text, mime_type or request_id) holds bytes that are not UTF-8: protobuf's API
    refuses to build one, so a placeholder of the same length is swapped for them in the serialized bytes."""
    placeholder = "@@PLACEHOLDER@@"
    chat = request(user("hi" if field != "text" else placeholder), **CHEAP)
    if field == "mime_type":
        chat.messages[0].parts.add(image=pb.Image(data=_png(), mime_type=placeholder))
    if field == "request_id":
        chat.request_id = placeholder
    data = _bytes(chat)
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), b"\xff\xfe" + b"\xc3" * (len(placeholder) - 2))


def _with_role(role: int) -> bytes:
    chat = request(user("hi"), **CHEAP)
    chat.messages[0].role = pb.Role.ValueType(role)  # proto3 enums are open: any number survives the wire
    return _bytes(chat)


def _with_unknown_field() -> bytes:
    """A valid request followed by field 99 = 1, as a newer client might send: proto3 skips unknown fields."""
    return _bytes(request(user("hi"), **CHEAP)) + b"\x98\x06\x01"  # tag 99 << 3 | varint as a varint, then 1


def _oversized(size: int) -> bytes:
    """A request of exactly ``size`` bytes: one image part padded to fill it."""
    chat = request(user(b"", "hi"), **CHEAP)
    overhead = len(_bytes(chat))
    for data_size in range(size - overhead, size - overhead - 16, -1):
        chat.messages[0].parts[0].image.data = b"\0" * data_size
        if len(data := _bytes(chat)) == size:
            return data
    raise AssertionError(f"cannot build a request of exactly {size} bytes")


def _with_mime(mime_type: str) -> pb.ChatRequest:
    chat = request(user("hi"), **CHEAP)
    chat.messages[0].parts.add(image=pb.Image(data=_png(), mime_type=mime_type))
    return chat



# --- images ------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    return _encode(Image.new("RGB", size, (200, 30, 40)), "PNG")


def _noise(size: int = 64) -> Image.Image:
    return Image.effect_noise((size, size), 60).convert("RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds a few bytes: decoding it would allocate
    width * height * 3 bytes (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def exif_rotated(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """``image`` stored on its side (turned 90 degrees anticlockwise) with EXIF Orientation 6 ("turn 90 degrees
    clockwise to display"), as phones save portrait photos: applying the tag gives ``image`` back upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _encode(image.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif)


def cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (32, 24), (0, 120, 200, 10)), "JPEG")


def palette_png(transparent: bool = False) -> bytes:
    image = _noise(32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def png_16bit() -> bytes:
    image = Image.fromarray(np.linspace(0, 65535, 32 * 24, dtype=np.uint16).reshape(24, 32))
    assert image.mode == "I;16"
    return _encode(image, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 24), color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# --- the catalogue -----------------------------------------------------------------------------------------

_LIMIT_BYTES = SERVED_LIMITS.max_request_bytes
_BOMB = bomb_png(100_000, 100_000)
_OVER = {
    "max_new_tokens": SERVED_LIMITS.max_new_tokens + 1,
    "max_images": SERVED_LIMITS.max_images + 1,
    "num_inference_steps": SERVED_LIMITS.max_denoising_steps + 1,
}

CATALOGUE: list[BadInput] = [
    # The request itself.
    BadInput("request", "bytes that are not protobuf", lambda: b"\xff\xff\xff not a protobuf",
             "not a valid gill.v1.ChatRequest"),
    BadInput("request", "a valid request cut off mid-field", lambda: _bytes(request(user("hello there")))[:-4],
             "not a valid gill.v1.ChatRequest"),
    BadInput("request", "empty request (0 bytes)", lambda: b"", "no messages"),
    BadInput("request", "unknown role enum value (99)", lambda: _with_role(99), "unknown role 99"),
    BadInput("request", "negative role enum value (-1)", lambda: _with_role(-1), "unknown role -1"),
    BadInput("request", "unspecified role (0)", lambda: _with_role(0), "has no role"),
    BadInput("request", "a message with no parts", lambda: _bytes(request(user())), "message 0 has no parts"),
    BadInput("request", "a part with neither text nor image",
             lambda: _bytes(pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part()])])),
             "message 0 part 0 is empty"),
    BadInput("request", "conversation ending with an assistant message",
             lambda: _bytes(request(user("hi"), (pb.ROLE_ASSISTANT, ("hello",)))), "must end with a user message"),
    BadInput("request", "an unknown field (number 99, as from a newer client)", _with_unknown_field, None),
    BadInput("request", f"request of {_LIMIT_BYTES + 1} bytes (test server limit {_LIMIT_BYTES})",
             lambda: _oversized(_LIMIT_BYTES + 1), "limit max_request_bytes"),
    BadInput("request", f"{SERVED_LIMITS.max_messages + 1} messages",
             lambda: _bytes(request(*[user("hi")] * (SERVED_LIMITS.max_messages + 1))), "limit max_messages"),
    BadInput("request", f"{SERVED_LIMITS.max_parts + 1} parts", _chat(*["hi"] * (SERVED_LIMITS.max_parts + 1)),
             "limit max_parts"),
    BadInput("request", f"{SERVED_LIMITS.max_images_per_request + 1} images",
             lambda: _bytes(request(user(*[_png()] * (SERVED_LIMITS.max_images_per_request + 1), "hi"), **CHEAP)),
             "limit max_images_per_request"),
    # Text.
    BadInput("text", "invalid UTF-8 in a text part", lambda: _invalid_utf8("text"), "not UTF-8"),
    BadInput("text", "invalid UTF-8 in an image's mime_type", lambda: _invalid_utf8("mime_type"), "not UTF-8"),
    BadInput("text", "invalid UTF-8 in request_id", lambda: _invalid_utf8("request_id"), "not UTF-8"),
    BadInput("text", "mime_type 'text/plain' on an image", lambda: _bytes(_with_mime("text/plain")),
             "is not an image type"),
    BadInput("text", "control characters, NUL, bidi overrides and emoji in text",
             _chat("a\x00b\x01\x07\x1b[31mred\x7f\u202etxet\u200b \U0001f600 \r\n\t end"), None),
    BadInput("text", "empty text part", _chat(""), None),
    BadInput("text", f"context longer than the LM window ({TINY_WINDOW} tokens on the tiny model)",
             _chat("word " * (2 * TINY_WINDOW)), "context too long"),
    BadInput("text", f"{SERVED_LIMITS.max_text_chars + 1} characters of text",
             _chat("x" * (SERVED_LIMITS.max_text_chars + 1)), "limit max_text_chars"),
    # Options.
    BadInput("options", "temperature NaN", _chat("hi", temperature=math.nan), "temperature=nan"),
    BadInput("options", "temperature -1", _chat("hi", temperature=-1.0), "temperature=-1"),
    BadInput("options", "temperature +inf", _chat("hi", temperature=math.inf), "temperature=inf"),
    BadInput("options", "top_p 0", _chat("hi", temperature=1.0, top_p=0.0), "top_p=0"),
    BadInput("options", "top_p 1.5", _chat("hi", temperature=1.0, top_p=1.5), "top_p=1.5"),
    BadInput("options", "top_p NaN", _chat("hi", temperature=1.0, top_p=math.nan), "top_p=nan"),
    BadInput("options", "top_p 0.5 with greedy decoding (temperature 0)", _chat("hi", top_p=0.5),
             "top_p must be 1 with temperature 0"),
    BadInput("options", "max_new_tokens 0", _chat("hi", max_new_tokens=0), "max_new_tokens=0"),
    BadInput("options", "max_new_tokens -5", _chat("hi", max_new_tokens=-5), "max_new_tokens=-5"),
    BadInput("options", f"max_new_tokens {_OVER['max_new_tokens']}",
             _chat("hi", max_new_tokens=_OVER["max_new_tokens"]), "limit max_new_tokens"),
    BadInput("options", "max_new_tokens 2**31 - 1", _chat("hi", max_new_tokens=2**31 - 1), "limit max_new_tokens"),
    BadInput("options", "num_inference_steps 0", _chat("hi", num_inference_steps=0), "num_inference_steps=0"),
    BadInput("options", f"num_inference_steps {_OVER['num_inference_steps']}",
             _chat("hi", num_inference_steps=_OVER["num_inference_steps"]), "limit max_denoising_steps"),
    BadInput("options", "num_inference_steps 2**31 - 1", _chat("hi", num_inference_steps=2**31 - 1),
             "limit max_denoising_steps"),
    BadInput("options", "max_images -1", _chat("hi", max_images=-1), "max_images=-1"),
    BadInput("options", f"max_images {_OVER['max_images']}", _chat("hi", max_images=_OVER["max_images"]),
             "limit max_images"),
    BadInput("options", "guidance_scale NaN", _chat("hi", guidance_scale=math.nan), "guidance_scale=nan"),
    BadInput("options", "guidance_scale 1000", _chat("hi", guidance_scale=1000.0), "guidance_scale=1000"),
    BadInput("options", "seed 2**64 - 1", _chat("hi", seed=2**64 - 1), "seed="),
    BadInput("options", "min_word_tokens -1", _chat("hi", min_word_tokens=-1), "min_word_tokens=-1"),
    BadInput("options", "ret_scale_factor -inf", _chat("hi", ret_scale_factor=-math.inf), "ret_scale_factor=-inf"),
    BadInput("options", "preview_every -1", _chat("hi", preview_every=-1), "preview_every=-1"),
    BadInput("options", "scheduler 'euler' (allowed: pndm, dpm++)", _chat("hi", scheduler="euler"),
             "scheduler='euler'"),
    # Images.
    BadInput("image", "zero-byte image", _chat(b"", "hi"), "image has no data"),
    BadInput("image", "bytes that are not an image", _chat(b"definitely not an image", "hi"),
             "not a recognised image format"),
    BadInput("image", "truncated PNG", lambda: _bytes(request(user(_encode(_noise(), "PNG")[:300], "hi"), **CHEAP)),
             "truncated or corrupt"),
    BadInput("image", "truncated JPEG", lambda: _bytes(request(user(_encode(_noise(), "JPEG")[:400], "hi"),
                                                                **CHEAP)), "truncated or corrupt"),
    BadInput("image", f"decompression bomb: a {len(_BOMB)}-byte PNG declaring 100000x100000 pixels",
             _chat(_BOMB, "hi"), "declared size is too large"),
    BadInput("image", "PNG declaring 8000x8000 pixels (over the 40-megapixel cap)",
             _chat(bomb_png(8000, 8000), "hi"), "pixel limit"),
    BadInput("image", "CMYK JPEG", _chat(cmyk_jpeg(), "hi"), None),
    BadInput("image", "palette PNG", _chat(palette_png(), "hi"), None),
    BadInput("image", "palette PNG with a transparent colour", _chat(palette_png(transparent=True), "hi"), None),
    BadInput("image", "16-bit greyscale PNG (mode I;16)", _chat(png_16bit(), "hi"), None),
    BadInput("image", "animated GIF (3 frames)", _chat(animated_gif(), "hi"), None),
    BadInput("image", "EXIF-rotated JPEG (Orientation 6)", _chat(exif_rotated(_noise()), "hi"), None),
    BadInput("image", "JPEG sent with mime_type image/png", _chat(_encode(_noise(), "JPEG"), "hi"), None),
]

