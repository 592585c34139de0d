"""Image decoding: every supported kind becomes RGB uint8; every bad kind becomes one reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.imaging.decode import REASONS, DecodeError, decode_image, read_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    return np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 90.0)], 2
    ).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_rgb_jpeg_and_png_roundtrip():
    arr = _gradient()
    png = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert png.ok and png.reason is None
    assert png.image.dtype == np.uint8 and png.image.shape == (48, 64, 3)
    np.testing.assert_array_equal(png.image, arr)
    jpg = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=95))
    assert jpg.image.shape == (48, 64, 3)
    assert np.abs(jpg.image.astype(int) - arr).mean() < 3


def test_exif_orientation_is_applied():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # red stripe on the left edge of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data).unwrap()
    assert img.shape == (80, 40, 3)  # width and height swapped
    # after a clockwise rotation the stored left edge is at the top
    assert img[:8, :, 0].mean() > 200 and img[:8, :, 1].mean() < 60
    assert img[-8:, :, 0].mean() < 60


def test_grayscale_palette_and_alpha_become_rgb():
    g = (np.arange(50 * 30) % 256).astype(np.uint8).reshape(30, 50)
    out = decode_image(_encode(Image.fromarray(g, "L"), "PNG")).unwrap()
    assert out.shape == (30, 50, 3)
    np.testing.assert_array_equal(out[..., 0], g)
    np.testing.assert_array_equal(out[..., 2], g)

    pal = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert decode_image(_encode(pal, "PNG")).unwrap().shape == (48, 64, 3)
    assert decode_image(_encode(pal, "GIF")).unwrap().shape == (48, 64, 3)

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (10, 20, 30, 255)  # opaque left half, fully transparent right half
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")).unwrap()
    assert out.shape == (20, 20, 3)
    assert tuple(out[5, 2]) == (10, 20, 30)
    assert tuple(out[5, 15]) == (255, 255, 255)  # transparent -> white, not black

    la = Image.fromarray(np.stack([np.full((8, 8), 100, np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    assert tuple(decode_image(_encode(la, "PNG")).unwrap()[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb():
    red = Image.new("RGB", (32, 24), (220, 30, 30)).convert("CMYK")
    assert red.mode == "CMYK"
    out = decode_image(_encode(red, "JPEG", quality=95)).unwrap()
    assert out.shape == (24, 32, 3)
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 150 and g < 90 and b < 90


def test_16bit_png_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    img16 = Image.fromarray(a)
    data = _encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data).unwrap()
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert list(out[0, :, 0]) == [0, 128, 255, 4]


def _bad_corpus(tmp: Path) -> dict[str, tuple[Path, str]]:
    """One file per kind of bad input -> (path, expected reason)."""
    good = _encode(Image.fromarray(_gradient(100, 90)), "JPEG", quality=90)
    good_png = _encode(Image.fromarray(_gradient(100, 90)), "PNG")
    files = {
        "empty.jpg": (b"", "empty_file"),
        "text.jpg": (b"this is not an image at all\n" * 10, "not_an_image"),
        "random.png": (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "not_an_image",
        ),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        "header_only.jpg": (good[:20], "truncated"),
        "bomb.png": (_png_header_only(100_000, 100_000), "too_many_pixels"),
        "just_over_limit.png": (_encode(Image.new("RGB", (101, 100)), "PNG"), "too_many_pixels"),
    }
    out = {}
    for name, (data, reason) in files.items():
        p = tmp / name
        p.write_bytes(data)
        out[name] = (p, reason)
    out["missing.jpg"] = (tmp / "does_not_exist.jpg", "missing")
    return out


def test_bad_image_corpus_gives_one_reason_each(tmp_path):
    corpus = _bad_corpus(tmp_path)
    for name, (path, reason) in corpus.items():
        res = read_image(str(path), max_pixels=10_000)
        assert res.image is None, name
        assert res.reason == reason, f"{name}: {res.reason} ({res.detail})"
        assert res.reason in REASONS
        with pytest.raises(DecodeError) as ei:
            res.unwrap()
        assert ei.value.reason == reason


def test_max_pixels_checked_from_header_before_decoding():
    # 100000 x 100000 x 3 bytes would be 30 GB; rejecting it must not try to allocate that.
    res = decode_image(_png_header_only(100_000, 100_000), max_pixels=40_000_000)
    assert res.reason == "too_many_pixels"
    assert "max_pixels" in res.detail or "exceeds" in res.detail or "pixels" in res.detail
    assert decode_image(_encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=10_000).ok


def test_fsspec_urls_are_read(tmp_path):
    import fsspec

    data = _encode(Image.fromarray(_gradient()), "PNG")
    with fsspec.open("memory://morphset-test/a.png", "wb") as f:
        f.write(data)
    assert read_image("memory://morphset-test/a.png").image.shape == (48, 64, 3)
    p = tmp_path / "b.png"
    p.write_bytes(data)
    assert read_image(p.as_uri()).ok


def test_an_oversized_file_is_refused_from_its_size_before_it_is_read(tmp_path, monkeypatch):
    """A 1.5 GB (sparse) .jpg: refused as file_too_large from a stat, no byte of it read."""
    import pipeline.imaging.decode as decode

    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(1536 << 20)
    reads = []
    monkeypatch.setattr(decode, "read_bytes", lambda *a, **k: reads.append(a) or b"")
    res = decode.read_image(str(big))
    assert res.reason == "file_too_large" and "stages.decode.max_pixels" in res.detail and reads == []
    assert decode.max_file_bytes(40_000_000) < (1536 << 20)


def test_an_image_an_earlier_stage_read_and_now_missing_is_a_storage_fault(tmp_path):
    from pipeline.imaging.decode import DecodedImages

    gone = str(tmp_path / "gone.jpg")
    assert DecodedImages().read(gone).reason == "missing"  # a first read: the image's reason
    with pytest.raises(OSError, match=r"cannot read an image the earlier stages read \(missing") as err:
        DecodedImages().read(gone, read_before=True)
    assert err.value.filename == gone
