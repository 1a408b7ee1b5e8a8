"""The photo of POST /v1/edits as phones and tools send it: base64 (line-wrapped or not, with or without
a `data:image/...;base64,` prefix) of a PNG, JPEG or multi-picture JPEG (MPO: its first frame), turned
upright by its EXIF orientation before anything else reads its size. Every way Pillow can refuse a
file is a `PhotoError` (413, 415 or 422), never an exception the server did not expect.

No web dependency; `sgfast.serve.schema` calls it off the event loop."""

import base64
import binascii
import contextlib
import io
import re

from sgfast.serve.errors import without_addresses

# A data URL's head (RFC 2397): what browsers' FileReader.readAsDataURL and many tools write.
DATA_URL = re.compile(r"^data:(?P<media>[^,;]*)(?:;[^,;=]+=[^,;]*)*;base64,", re.IGNORECASE)
FORMATS = ("PNG", "JPEG", "MPO")  # MPO: a JPEG with more pictures after the first (phones' HDR, 3D)


def photo_bytes(text):
    """The file a base64 `photo` field carries, or a PhotoError ("invalid"): whitespace anywhere (RFC
    2045's 76-column lines) and a data URL's `data:image/...;base64,` head are allowed."""
    from sgfast.invert import PhotoError

    head = DATA_URL.match(text)
    if head is not None:
        media = head.group("media").strip().lower()
        if media and not media.startswith("image/"):
            raise PhotoError("unsupported", f"the photo is a data URL of {media!r}; send an image/png or image/jpeg one")
        text = text[head.end():]
    packed = "".join(text.split())
    try:
        return base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError):
        raise PhotoError(
            "invalid",
            "photo is not base64: send the PNG or JPEG file's bytes base64-encoded (standard alphabet, padded; "
            "line breaks and a data:image/png;base64, prefix are allowed)",
        ) from None


def load_photo(data, max_side=2048, max_bytes=20 * 2**20):
    """An uploaded file (bytes) as an upright RGB PIL image, or a PhotoError saying what was wrong and
    what is allowed: at most `max_bytes`, a readable PNG, JPEG or MPO (its first frame), an 8-bit mode,
    sides multiples of 8 in [8, max_side] (read from the header, before the pixels are decoded; the
    same either way up). Then it is decoded and turned upright by its EXIF orientation."""
    import PIL.Image
    import PIL.ImageOps

    from sgfast.invert import PHOTO_MODES, PhotoError

    if not data:
        raise PhotoError("unsupported", "the photo is empty: send a PNG or JPEG file")
    if len(data) > max_bytes:
        raise PhotoError("too_large", f"the photo is {len(data)} bytes; at most {max_bytes} are allowed")
    with refusals("is not a readable image"):
        image = PIL.Image.open(io.BytesIO(data))
        image.seek(0)  # a multi-frame file: its first picture
    if image.format not in FORMATS:
        raise PhotoError("unsupported", f"the photo is a {image.format} image; PNG and JPEG are allowed (a multi-picture JPEG too: its first picture)")
    if image.mode not in PHOTO_MODES:
        raise PhotoError("unsupported", f"the photo's mode is {image.mode!r} (e.g. CMYK or 16-bit); 8-bit {', '.join(PHOTO_MODES)} are allowed")
    width, height = image.size  # the check is the same either way up: nothing is decoded before it
    if not (8 <= width <= max_side and 8 <= height <= max_side) or width % 8 or height % 8:
        raise PhotoError("invalid", f"the photo is {width}x{height}; its sides must be multiples of 8 between 8 and {max_side}")
    with refusals("is truncated or corrupt"):
        image.load()
        upright = PIL.ImageOps.exif_transpose(image)  # as every viewer shows it
        return upright.convert("RGB")


@contextlib.contextmanager
def refusals(what):
    """Any exception of Pillow's decoders in this block (OSError, ValueError such as "Decompressed data
    too large", SyntaxError, struct.error, EOFError, IndexError, ...) is the file's fault: a PhotoError
    (413 for a decompression bomb, else 415) whose message carries no object addresses."""
    import PIL.Image

    from sgfast.invert import PhotoError

    try:
        yield
    except PhotoError:
        raise
    except Exception as error:
        reason = without_addresses(str(error)) or type(error).__name__
        if isinstance(error, PIL.UnidentifiedImageError):  # its message names the file object
            reason = "no image format recognised"
        if isinstance(error, PIL.Image.DecompressionBombError) or "decompressed data too large" in reason.lower():
            raise PhotoError("too_large", f"the photo decompresses to more than this server takes ({reason})") from None
        raise PhotoError("unsupported", f"the photo {what} ({type(error).__name__}: {reason}); send a PNG or JPEG file") from None
