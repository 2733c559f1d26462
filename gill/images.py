"""Decoding user images safely: bounded size, any common mode, EXIF orientation applied."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from gill.errors import InputError

# Refuse images whose declared size would need more than this many pixels (a decompression bomb):
# 40 megapixels is larger than any camera photo users send and about 160 MB decoded.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def load_image(source: Image.Image | bytes | str | Path, what: str = "image") -> Image.Image:
    """An RGB ``PIL.Image`` from a PIL image, encoded bytes or a file path; raises :class:`InputError`."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)):
            try:
                data = Path(source).read_bytes()
            except OSError as error:
                raise InputError(f"{what}: cannot read {source} ({error.strerror})") from error
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise InputError(f"{what}: expected image bytes, a path or a PIL image, got {type(source).__name__}")
        if not data:
            raise InputError(f"{what}: empty (0 bytes)")
        if len(data) > MAX_IMAGE_BYTES:
            raise InputError(f"{what}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
        image = _decode(data, what)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not reject an otherwise good image
        pass
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _decode(data: bytes, what: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{what}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
            image.seek(0)  # animated images: the first frame
            image.load()
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InputError(f"{what}: declared size is too large (a decompression bomb?); at most "
                             f"{MAX_IMAGE_PIXELS} pixels are allowed") from error
        except UnidentifiedImageError as error:
            raise InputError(f"{what}: not a recognised image format (PNG, JPEG, WebP, GIF, BMP, TIFF ...)") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(f"{what}: truncated or corrupt image data ({error})") from error
    return image


# Modes PNG stores as they are; anything else (CMYK, YCbCr, F ...) is converted to RGB first.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (lossless, so a decode gives the same pixels back)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
