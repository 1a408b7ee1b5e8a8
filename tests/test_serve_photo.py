"""POST /v1/edits (FastAPI TestClient on the tiny pipeline): a photo sent as base64 in the JSON body is
checked before it is decoded further than its header (non-images, over-cap bytes and sides, a 1x1
image, CMYK, 16-bit), an RGBA or palette PNG is taken as RGB, a valid edit comes back as an image
unlike the photo, and every request ends in exactly one counted outcome."""

import base64
import io

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.iteration import IterationEngine  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

PROMPT = "a red circle and a blue square"
MOVE = [{"type": "move", "word": "circle", "dx": 0.25}]
PHOTO_CAP = 20_000


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


def make_client(sg, engine_class=Engine):
    from fastapi.testclient import TestClient

    limits = Limits(max_steps=6, default_steps=4, min_steps=1, max_edits=3, max_body_bytes=4096, max_photo_bytes=PHOTO_CAP)
    engine = engine_class(sg, model="tiny", cost=CostModel.fixed(20, 60, 10), limits=limits, threads=1)
    client = TestClient(create_app(engine), base_url="http://localhost")
    client.engine = engine
    return client


@pytest.fixture(scope="module")
def client(tiny_sg):
    with make_client(tiny_sg) as c:
        yield c


def scene_photo(size=64):
    image = PIL.Image.new("RGB", (size, size), (235, 235, 235))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((8, 20, 28, 40), fill=(220, 30, 30))
    draw.rectangle((38, 22, 56, 40), fill=(30, 30, 220))
    return image


def encoded(image, format="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def post(client, data, **fields):
    body = {"photo": base64.b64encode(data).decode(), "prompt": PROMPT, "edits": MOVE, **fields}
    return client.post("/v1/edits", json=body)


def error_of(response, status):
    """The server's one error schema: {"detail": {"status", "type", "message", ...}}."""
    assert response.status_code == status, response.text[:300]
    detail = response.json()["detail"]
    assert detail["status"] == status and isinstance(detail["message"], str) and detail["message"]
    return detail


def photo_outcomes(client):
    found = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("sgfast_photo_edits_total{"):
            label, value = line.split("} ")
            found[label.split('"')[1]] = found.get(label.split('"')[1], 0) + float(value)
    return found


def pixels(response):
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(response.json()["image"]))).convert("RGB"), np.int16)


def test_a_valid_edit_returns_an_edited_image(client):
    photo = scene_photo()
    r = post(client, encoded(photo))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["width"] == body["height"] == 64 and body["steps"] == 4 and body["guided_steps"] > 0
    assert body["reference_steps"] == 8 and body["strength"] == 1.0  # inversion + regeneration
    assert set(body["inversion"]) == {"psnr", "vae_psnr"} and "seed" not in body
    assert np.abs(pixels(r) - np.asarray(photo, np.int16)).mean() > 1.0
    png = post(client, encoded(photo), format="png")
    assert png.headers["content-type"] == "image/png" and "psnr" in png.headers["x-sgfast-inversion"]


def test_rgba_and_palette_pngs_are_taken_as_rgb(client):
    photo = scene_photo()
    for image in (photo.convert("RGBA"), photo.convert("P"), photo.convert("L")):
        r = post(client, encoded(image), strength=0.75, steps=6)
        assert r.status_code == 200, (image.mode, r.text)


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("not base64", 422, "not base64"),
        ("text", 415, "not a readable image"),
        ("bmp", 415, "PNG and JPEG are allowed"),
        ("cmyk jpeg", 415, "'CMYK'"),
        ("16-bit png", 415, "'I;16'"),
        ("1x1 png", 422, "multiples of 8"),
        ("over the side cap", 422, "between 8 and 128"),
        ("over the byte cap", 413, f"at most {PHOTO_CAP}"),
        ("over the body cap", 413, "over the cap"),
    ],
)
def test_bad_photos_get_clear_4xx(client, case, status, message):
    photo = scene_photo()
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    data = {
        "text": b"hello, not an image",
        "bmp": encoded(photo, "BMP"),
        "cmyk jpeg": encoded(photo.convert("CMYK"), "JPEG"),
        "16-bit png": encoded(PIL.Image.fromarray(np.full((64, 64), 40000, np.uint16))),
        "1x1 png": encoded(photo.resize((1, 1))),
        "over the side cap": encoded(PIL.Image.new("RGB", (4096, 64))),
        "over the byte cap": encoded(noise.crop((0, 0, 80, 88))),  # noise does not compress: ~21 200 bytes
        "over the body cap": encoded(noise.resize((256, 256))),
        "side not a multiple of the unet's": encoded(photo.resize((72, 64))),
    }.get(case, b"")
    before = photo_outcomes(client)
    if case == "not base64":
        r = client.post("/v1/edits", json={"photo": "not base64!", "prompt": PROMPT, "edits": MOVE})
    else:
        r = post(client, data)
    assert message in error_of(r, status)["message"]
    after = photo_outcomes(client)
    assert sum(after.values()) == sum(before.values()) + 1


def test_bad_fields_and_words_are_422(client):
    photo = encoded(scene_photo())
    assert "edits" in error_of(post(client, photo, edits=[]), 422)["message"]
    assert "strength" in error_of(post(client, photo, strength=0), 422)["message"]
    assert "leaves none of the guided steps" in error_of(post(client, photo, strength=0.25), 422)["message"]
    assert "steps" in error_of(post(client, photo, steps=7), 422)["message"]
    detail = error_of(post(client, photo, edits=[{"type": "move", "word": "triangle", "dx": 0.1}]), 422)
    assert "triangle" in detail["message"] and "circle" in detail["words"]
    assert "seed" in error_of(post(client, photo, seed=1), 422)["message"]  # the photo is the seed


def test_photo_edits_count_one_outcome_each_and_keep_images_apart(tiny_sg):
    with make_client(tiny_sg) as c:
        ok = post(c, encoded(scene_photo()))
        bad = post(c, b"nope")
        big = post(c, encoded(PIL.Image.new("RGB", (4096, 64))))
        c.post("/v1/images", json={"prompt": PROMPT, "steps": 3})
        assert (ok.status_code, bad.status_code, big.status_code) == (200, 415, 422)
        assert photo_outcomes(c) == {"ok": 1, "unsupported_media_type": 1, "invalid": 1}
        images = [line for line in c.get("/metrics").text.splitlines() if line.startswith("sgfast_requests_total{")]
        assert images == ['sgfast_requests_total{outcome="ok"} 1.0']


def test_the_iteration_scheduler_runs_photo_edits(tiny_sg):
    with make_client(tiny_sg, IterationEngine) as c:
        r = post(c, encoded(scene_photo()))
        assert r.status_code == 200, r.text
        assert photo_outcomes(c) == {"ok": 1}


def test_the_built_in_model_moves_an_uploaded_photos_object(default_sg):
    """The benchmark's scene 5 (as `tests/test_invert.py`'s fast slice), sent to the server as a PNG with
    a bare move: the server edits with the model's photo settings and the object lands on target."""
    from fastapi.testclient import TestClient

    from benchmarks.photo_edit import check_move, free_move, photos

    seed, scene, word_object = photos(5)[4]
    dx, dy = free_move(scene, word_object)
    limits = Limits(max_steps=25, default_steps=25, max_body_bytes=4096)
    engine = Engine(default_sg, model="default", cost=CostModel.fixed(20, 60, 10), limits=limits, threads=1)
    with TestClient(create_app(engine), base_url="http://localhost") as c:
        edits = [{"type": "move", "word": word_object.shape, "dx": dx, "dy": dy}]
        r = post(c, encoded(PIL.Image.fromarray(scene.image)), prompt=scene.caption, edits=edits)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["strength"] == 0.8 and r.json()["inversion"]["psnr"] > 25
        image = PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB")
        ok, error = check_move(scene, word_object, (dx, dy), image)
        assert ok, error


# ----------------------------------------------------------------------------------------------
# Photos as phones and tools write them; every way Pillow refuses a file


def png_chunk(kind, data):
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_bomb():
    """An 8 KB PNG whose compressed text chunk expands to 8 MB (Pillow: ValueError "Decompressed data too large")."""
    import zlib

    data = encoded(PIL.Image.new("RGB", (64, 64)))
    return data[:33] + png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"A" * 2**23, 9)) + data[33:]


def test_pillow_refusals_are_4xx_without_addresses(client):
    png = encoded(scene_photo())
    cases = [
        (text_bomb(), 413, "decompresses to more than"),
        (b"hello, not an image", 415, "not a readable image"),
        (png[: len(png) // 2], 415, "truncated or corrupt"),
        (png[:16] + b"\xff" * 8 + png[24:], 415, "PNG or JPEG"),  # IHDR's sides scrambled (its CRC then fails)
        (encoded(scene_photo(), "JPEG")[:300], 415, "PNG or JPEG"),
    ]
    before = photo_outcomes(client)
    for data, status, message in cases:
        detail = error_of(post(client, data), status)
        assert message in detail["message"] and " at 0x" not in detail["message"], detail
    assert sum(photo_outcomes(client).values()) == sum(before.values()) + len(cases)


@pytest.mark.parametrize("error", [OSError("broken data stream"), ValueError("Decompressed data too large"), SyntaxError("not a PNG file"),
                                   EOFError(), IndexError("list index out of range"), KeyError(7), TypeError("bad"), ZeroDivisionError(),
                                   "struct", "bomb"])
def test_every_exception_of_pillows_decoders_is_a_photo_error(error):
    import struct

    from sgfast.invert import PhotoError
    from sgfast.serve.photo import refusals

    if error == "struct":
        error = struct.error("unpack requires a buffer of 4 bytes")
    elif error == "bomb":
        error = PIL.Image.DecompressionBombError("Image size (1000000000 pixels) exceeds limit")
    with pytest.raises(PhotoError) as refused:
        with refusals("is not a readable image"):
            raise error
    too_large = isinstance(error, PIL.Image.DecompressionBombError) or "too large" in str(error)
    assert refused.value.kind == ("too_large" if too_large else "unsupported")
    assert type(error).__name__ in str(refused.value) or too_large


def test_photo_bytes_take_wrapped_base64_and_data_urls():
    from sgfast.invert import PhotoError
    from sgfast.serve.photo import photo_bytes

    data = encoded(scene_photo())
    assert photo_bytes(base64.encodebytes(data).decode()) == data  # 76 columns, "\n"
    assert photo_bytes(base64.encodebytes(data).decode().replace("\n", "\r\n")) == data
    assert photo_bytes("data:image/png;base64," + base64.b64encode(data).decode()) == data
    assert photo_bytes("DATA:image/jpeg;name=a.jpg;base64,\n" + base64.encodebytes(data).decode()) == data
    with pytest.raises(PhotoError, match="data URL of 'text/plain'"):
        photo_bytes("data:text/plain;base64," + base64.b64encode(data).decode())
    with pytest.raises(PhotoError, match="line breaks and a data:image/png;base64, prefix are allowed"):
        photo_bytes(base64.b64encode(data).decode()[:-2] + "!!")


def mpo(first, second):
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], quality=95)
    return buffer.getvalue()


def with_orientation(image, orientation, format="JPEG"):
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, format, exif=exif.tobytes(), **({"quality": 95} if format == "JPEG" else {}))


def test_multi_picture_jpegs_give_their_first_picture_and_exif_turns_photos_upright():
    from sgfast.serve.photo import load_photo

    photo = scene_photo()
    other = PIL.Image.new("RGB", photo.size, (0, 200, 0))
    data = mpo(photo, other)
    assert PIL.Image.open(io.BytesIO(data)).format == "MPO"
    first = np.asarray(PIL.Image.open(io.BytesIO(encoded(photo, "JPEG", quality=95))).convert("RGB"), np.int16)
    assert np.abs(np.asarray(load_photo(data), np.int16) - first).max() <= 2  # the first picture, not the green one
    landscape = photo.crop((0, 16, 64, 48))  # 64x32, stored sideways: orientation 6 = turn 90 degrees clockwise
    for format in ("JPEG", "PNG"):
        upright = np.asarray(load_photo(with_orientation(landscape, 6, format)), np.int16)
        assert upright.shape == (64, 32, 3)
        right, wrong = (np.abs(upright - np.asarray(landscape.transpose(turn), np.int16)).mean()
                        for turn in (PIL.Image.Transpose.ROTATE_270, PIL.Image.Transpose.ROTATE_90))
        assert right < (8 if format == "JPEG" else 0.01) and wrong > 40, (right, wrong)
    with pytest.raises(ValueError, match="64x32.*between 8 and 48"):
        load_photo(with_orientation(landscape, 6), max_side=48)  # a side over the cap, whichever way up
    assert load_photo(with_orientation(landscape, 1), max_side=64).size == (64, 32)


def test_a_phones_photo_is_edited_upright(client):
    """An MPO with an EXIF orientation, sent as `base64` without -w0 writes it behind a data URL head."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 8  # turn 90 degrees counter-clockwise
    buffer = io.BytesIO()
    scene_photo().crop((0, 16, 64, 48)).save(buffer, "MPO", save_all=True, append_images=[scene_photo()], exif=exif.tobytes())
    text = "data:image/jpeg;base64," + base64.encodebytes(buffer.getvalue()).decode()
    r = client.post("/v1/edits", json={"photo": text, "prompt": PROMPT, "edits": MOVE, "steps": 2})
    assert r.status_code == 200, r.text[:300]
    assert (r.json()["width"], r.json()["height"]) == (32, 64)


# ----------------------------------------------------------------------------------------------
# Fuzz: photos from a seeded generator (chunk structures, sizes, truncations, bit flips)


def png_chunks(data):
    """[(type, body)] of a PNG (after its signature)."""
    import struct

    chunks, at = [], 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def jpeg_segments(data):
    """[marker + body] of a JPEG's segments up to its scan, then the rest as one piece."""
    import struct

    segments, at = [data[:2]], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        if data[at + 1] == 0xDA:  # start of scan: the entropy-coded data follows
            break
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        segments.append(data[at : at + 2 + length])
        at += 2 + length
    return segments + [data[at:]]


def random_photo(rng):
    """A seeded random file: a real image of a random size, mode and format, then mangled."""
    import struct
    import zlib

    side = lambda: rng.choice([8, 16, 24, 32, 7, 1, 40, 4096])
    size = (side(), side()) if rng.random() < 0.3 else (rng.choice([16, 32]),) * 2
    size = size if size[0] * size[1] <= 4096 * 64 else (32, 32)
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels).convert(rng.choice(["RGB", "L", "P", "RGBA", "CMYK", "1"]))
    format = rng.choice(["PNG", "JPEG", "MPO"]) if image.mode in ("RGB", "L") else "PNG"
    if image.mode == "CMYK":
        format = rng.choice(["JPEG", "MPO"])
    if image.mode == "1" and rng.random() < 0.5:
        format = "GIF"
    kwargs = {}
    if rng.random() < 0.3:
        exif = PIL.Image.Exif()
        exif[0x0112] = rng.choice([0, 1, 3, 6, 8, 9, 65535])
        kwargs["exif"] = exif.tobytes()
    if format == "MPO":
        kwargs.update(save_all=True, append_images=[image])
    data = encoded(image, format, **kwargs)
    what = rng.random()
    if format == "PNG" and what < 0.4:  # the chunk structure
        chunks = png_chunks(data)
        for _ in range(rng.randrange(1, 4)):
            move = rng.randrange(5)
            if move == 0 and len(chunks) > 1:
                del chunks[rng.randrange(len(chunks))]
            elif move == 1:
                chunks.insert(rng.randrange(len(chunks) + 1), chunks[rng.randrange(len(chunks))])
            elif move == 2:
                kind = rng.choice([b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"sPLT", b"acTL", b"fcTL", b"xYzW", b"IHDR"])
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
                if kind in (b"zTXt", b"iCCP"):
                    body = b"k\0\0" + zlib.compress(b"A" * rng.choice([10, 10**5, 2**23]), 9)
                chunks.insert(rng.randrange(1, len(chunks) + 1), (kind, body))
            elif move == 3:
                rng.shuffle(chunks)
            else:
                i = rng.randrange(len(chunks))
                chunks[i] = (chunks[i][0], chunks[i][1][: rng.randrange(len(chunks[i][1]) + 1)])
        data = data[:8] + b"".join(png_chunk(k, b) if rng.random() < 0.9 else struct.pack(">I", rng.randrange(2**32)) + k + b for k, b in chunks)
    elif format in ("JPEG", "MPO") and what < 0.4:  # the segment structure
        segments = jpeg_segments(data)
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(1, len(segments))
            move = rng.randrange(3)
            if move == 0:
                del segments[i]
            elif move == 1:
                segments.insert(i, segments[rng.randrange(1, len(segments))])
            else:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
                segments.insert(i, b"\xff" + bytes([rng.choice([0xE1, 0xE2, 0xC0, 0xDB, 0xC4, 0xDD])]) + struct.pack(">H", len(body) + 2) + body)
        data = b"".join(segments)
    elif what < 0.65:
        data = data[: rng.randrange(len(data) + 1)]
    elif what < 0.9:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 9)):
            at = rng.randrange(len(flipped))
            flipped[at] ^= 1 << rng.randrange(8)
        data = bytes(flipped)
    return data


def random_photo_field(rng, data):
    text = base64.b64encode(data).decode()
    how = rng.random()
    if how < 0.2:
        return base64.encodebytes(data).decode()
    if how < 0.3:
        return "data:image/png;base64," + text
    if how < 0.35:
        return text[: rng.randrange(len(text) + 1)]
    return text


def fuzz_photos(client, count, seed):
    import random

    rng = random.Random(seed)
    statuses, sent = {}, sum(photo_outcomes(client).values())
    for _ in range(count):
        data = random_photo(rng)
        body = {"photo": random_photo_field(rng, data), "prompt": PROMPT, "edits": MOVE, "steps": 2}
        r = client.post("/v1/edits", json=body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500 and r.headers["content-type"] == "application/json", (data[:64], r.text[:300])
        if r.status_code >= 400:
            error_of(r, r.status_code)
        else:
            assert r.json()["image"]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert sum(photo_outcomes(client).values()) == sent + count  # one counted outcome each, none lost
    assert post(client, encoded(scene_photo()), steps=2).status_code == 200
    return statuses


def test_fuzz_photos(tiny_sg):
    with make_client(tiny_sg) as c:
        statuses = fuzz_photos(c, 30, seed=0)
    assert statuses.get(200, 0) >= 2 and statuses.get(415, 0) >= 8 and statuses.get(422, 0) >= 1, statuses


@pytest.mark.slow
def test_fuzz_photos_hundreds(tiny_sg):
    with make_client(tiny_sg) as c:
        statuses = fuzz_photos(c, 600, seed=1)
    assert statuses.get(200, 0) >= 20 and statuses.get(413, 0) >= 1, statuses
