"""Photo uploads: the multipart body read within its limit, then decoded with every size checked before
pixels are allocated (docs/security.md). Each refusal is an :class:`~server.schemas.ApiError` (413, 415,
422) the page shows as is. Also the default photo the page starts with.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from fastapi import Request

from .schemas import ApiError


async def read_photo(request: Request, limit: int) -> bytes:
    """The 'file' field of a multipart upload, at most ``limit`` bytes. The request guard has already
    read the body into memory within the upload limit, so parsing it never waits on the network."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "not_multipart", "send the photo as multipart/form-data in a field named 'file'")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
    except Exception as err:
        text = " ".join(str(err).split())[:120] or type(err).__name__
        raise ApiError(400, "bad_request", f"could not parse the multipart upload ({text})") from err
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "bad_request", "the multipart upload has no file field named 'file'")
        data = await upload.read(limit + 1)
    finally:
        await form.close()
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"the photo is over the {limit / 2**20:g} MB limit")
    return data


#: Formats Pillow may try (JPEG includes the MPO files many phones write). Fewer parsers, less attack surface.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def _too_large(width: int, height: int, max_side: int) -> ApiError:
    return ApiError(
        413,
        "image_too_large",
        f"the photo is {width}×{height} pixels; the limit is {max_side}×{max_side}, please scale it down",
    )


def _to_rgb(image: Any) -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8. 16-bit and 32-bit grey are scaled to 8 bits first: Pillow's own
    conversion clips them (a 16-bit photo comes out almost all white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def decode_upload(data: bytes, max_side: int) -> np.ndarray:
    """Uploaded bytes → H×W×3 uint8 RGB, refusing non-images (415) and oversized pictures (413).

    The size is read from the header before any pixel is decoded, so a small file that claims
    60000×60000 pixels is refused without allocating them (Pillow's own decompression-bomb refusal, which
    it raises while opening such a file, is the same 413). EXIF orientation is applied, as phone photos
    are often stored sideways.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(415, "not_an_image", "the uploaded file is empty; choose a photo (JPEG, PNG or WebP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the side limit decides
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise ApiError(
            413, "image_too_large", f"the photo has far too many pixels; the limit is {max_side}×{max_side}"
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise ApiError(
            415,
            "not_an_image",
            "the uploaded file is not an image this server can read (use JPEG, PNG or WebP)",
        ) from err
    width, height = image.size
    if width > max_side or height > max_side:
        raise _too_large(width, height, max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.width > max_side or image.height > max_side:  # pragma: no cover - transposes only
                raise _too_large(image.width, image.height, max_side)
            rgb = _to_rgb(image)
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise _too_large(width, height, max_side) from err
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as err:
        raise ApiError(415, "not_an_image", "the image file is corrupt or truncated") from err
    except MemoryError as err:  # pragma: no cover - the side limit keeps decodes well below this
        raise _too_large(width, height, max_side) from err
    if rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise ApiError(
            422, "no_face", f"the photo is only {rgb.shape[1]}×{rgb.shape[0]} pixels: no face fits"
        )
    return np.ascontiguousarray(rgb)


def sample_source_jpeg() -> bytes:
    """The default photo the page starts with (scikit-image's astronaut portrait, available offline)."""
    import cv2

    from dagan.samples import astronaut

    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 image
        raise RuntimeError("could not encode the sample photo")
    return buf.tobytes()
