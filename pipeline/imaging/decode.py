"""Image bytes -> RGB uint8 (H, W, 3), shared by every stage that reads pixels.

Contract: :func:`decode_image` and :func:`read_image` never raise for bad data. They return a
:class:`DecodeResult` whose ``image`` is set on success and whose ``reason`` is a short code on
failure (the stage writes it to ``failure_reason``; the store counts rows by it):

- ``empty_file``      zero bytes
- ``not_an_image``    no image format recognised
- ``too_many_pixels`` width x height above ``max_pixels`` (decompression-bomb guard; checked from
  the header, before any pixel is decoded)
- ``file_too_large`` (``read_image`` only) more bytes than any image within ``max_pixels`` needs
  (:func:`max_file_bytes`; checked from the file's size before anything is read)
- ``truncated``       the header is fine but the pixel data ends early or is corrupt
- ``decode_error``    anything else the decoder refuses (unsupported mode, invalid size ...)
- ``missing`` / ``unreadable``  (``read_image`` only) the file is gone or cannot be read

``detail`` holds a human-readable message for logs. Callers that prefer exceptions use
``DecodeResult.unwrap()`` which raises :class:`DecodeError` carrying the same reason.

Conversions: EXIF orientation is applied (an unreadable EXIF block is ignored); grayscale, 16-bit, palette, CMYK (incl. Adobe
inverted CMYK JPEG) become RGB; alpha is composited onto white so transparent regions do not
turn black. Pillow is used (not OpenCV) because it reads the header lazily, which is what makes
the pixel-count check possible before decoding.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
ALPHA_BACKGROUND = (255, 255, 255)

# Leading bytes of the formats Pillow reads most; used to tell "cut short" from "not an image".
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)

REASONS = (
    "empty_file",
    "not_an_image",
    "too_many_pixels",
    "file_too_large",
    "truncated",
    "decode_error",
    "missing",
    "unreadable",
    "symlink_escapes_root",
)
# Reasons a later attempt may not see (a flaky NFS mount, an object store's hiccup): a stage that
# meets one after ingest saw the file fails the shard (retried) rather than dropping the image.
TRANSIENT_REASONS = ("missing", "unreadable")
# a later stage's reason: the file no longer decodes to the size an earlier stage recorded
IMAGE_CHANGED = "image_changed"


def dataset_root(index: object) -> str | None:
    """The dataset root recorded in an index table's metadata (what opened files must lie in)."""
    md = getattr(getattr(index, "schema", None), "metadata", None) or {}
    root = md.get(b"morphset.dataset_root")
    return root.decode() if root else None


class DecodeError(ValueError):
    """An image could not be decoded; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeResult:
    image: np.ndarray | None  # (H, W, 3) uint8 RGB, C-contiguous
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.image is not None

    def unwrap(self) -> np.ndarray:
        if self.image is None:
            raise DecodeError(self.reason or "decode_error", self.detail)
        return self.image


def _fail(reason: str, detail: str) -> DecodeResult:
    return DecodeResult(None, reason, detail)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB uint8."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        g = np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeResult:
    """Decode image bytes to RGB uint8 with EXIF orientation applied; never raises for bad data."""
    if not data:
        return _fail("empty_file", "0 bytes")
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's warning; its hard error (2x its limit) is caught.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if data.startswith(_SIGNATURES):
                # a known image header that Pillow cannot even size: the file was cut short
                return _fail("truncated", f"image header present but unreadable ({len(data)} bytes)")
            return _fail("not_an_image", f"no image format recognised in {len(data)} bytes")
        except Image.DecompressionBombError as exc:
            return _fail("too_many_pixels", str(exc))
        except (OSError, ValueError, SyntaxError) as exc:
            # Pillow raises these when a recognised header is itself cut short or corrupt.
            return _fail("truncated", f"{type(exc).__name__}: {exc}")
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                return _fail("decode_error", f"invalid size {w}x{h}")
            if w * h > max_pixels:
                return _fail("too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            try:
                img.load()
            except (OSError, SyntaxError, EOFError) as exc:
                return _fail("truncated", f"{type(exc).__name__}: {exc}")
            try:
                img = ImageOps.exif_transpose(img)
            except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
                # unreadable orientation = no orientation, as image viewers treat it
                log.debug("EXIF orientation ignored: %s: %s", type(exc).__name__, exc)
            rgb = _to_rgb(img)
        except Image.DecompressionBombError as exc:
            return _fail("too_many_pixels", str(exc))
        except (OSError, ValueError, TypeError, SyntaxError, MemoryError) as exc:
            return _fail("decode_error", f"{type(exc).__name__}: {exc}")
        finally:
            img.close()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return _fail("decode_error", f"unexpected decoded shape {rgb.shape}")
    return DecodeResult(rgb)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can need: 8 bytes a pixel (16-bit RGBA
    stored raw) and 16 MiB of metadata. A larger file is refused from its size alone, so that one
    huge file never reaches a worker's memory."""
    return 8 * int(max_pixels) + (16 << 20)


def file_size(uri: str, storage_options: dict | None = None) -> int | None:
    """The file's size from a stat (None when the file system cannot say)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        size = fs.size(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, NotImplementedError):
        return None
    return None if size is None else int(size)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Read a whole file through fsspec (local path or URL)."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


def inside_root(path: str, root: str) -> bool:
    """``path`` with every component resolved (symlinks followed) lies inside resolved ``root``.
    Local paths only; URLs of object stores have no symlinks and are always inside."""
    if "://" in path and not path.startswith("file://"):
        return True
    strip = lambda p: p[len("file://") :] if p.startswith("file://") else p  # noqa: E731
    real, real_root = os.path.realpath(strip(path)), os.path.realpath(strip(root))
    return os.path.commonpath([real, real_root]) == real_root


def read_image(
    uri: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict | None = None,
    root: str | None = None,
) -> DecodeResult:
    """Read ``uri`` and decode it; a missing or unreadable file is a reason, not an exception.

    ``root``: the dataset root the file must lie in once every symlink is resolved (checked again
    when the file is opened: a link may have changed since ingest); outside it the reason is
    ``symlink_escapes_root`` and nothing is read."""
    if root is not None and not inside_root(uri, root):
        return _fail("symlink_escapes_root", f"{uri} resolves outside {root}")
    try:
        size = file_size(uri, storage_options)
        if size is not None and size > max_file_bytes(max_pixels):
            return _fail(
                "file_too_large",
                f"{uri}: {size} bytes, more than an image of at most {max_pixels} pixels needs "
                f"({max_file_bytes(max_pixels)}; stages.decode.max_pixels)",
            )
        data = read_bytes(uri, storage_options)
    except FileNotFoundError as exc:
        return _fail("missing", str(exc))
    except (OSError, ValueError) as exc:
        return _fail("unreadable", f"{type(exc).__name__}: {exc}")
    return decode_image(data, max_pixels)


class StageParamsSource(Protocol):
    """A manifest or a stage's view of it (decoding imports neither: they sit above it)."""

    def stage_params(self, stage: str) -> dict: ...


def max_pixels_from(config: StageParamsSource) -> int:
    """``stages.decode.max_pixels`` (defaults filled) of a manifest or a stage's view of it."""
    return int(config.stage_params("decode")["max_pixels"])


class DecodedImages:
    """The decoded images of one shard, handed from one pixel stage to the next in memory.

    The runner gives one store to consecutive stages that read pixels (detect → landmarks →
    embed) of one shard inside one task, so each image is decoded once: :meth:`read` decodes on
    the first request and returns the kept pixels afterwards. Memory is bounded by
    ``budget_bytes``: past it, images are decoded but not kept (a stage that asks again decodes
    again), and the first images stay — every stage walks a shard in the same order, so keeping
    a fixed prefix serves each later stage, where evicting the oldest would serve none.
    Failures are not kept: a later stage reads a missing or unreadable file again.
    ``decodes`` counts the decodes done, for the sidecar and ``report.json``."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.budget_bytes = int(budget_bytes)
        self.kept_bytes = 0
        self.decodes = 0
        self._kept: dict[tuple[str, int, str | None], DecodeResult] = {}

    def read(
        self,
        uri: str,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: dict | None = None,
        root: str | None = None,
        size: tuple[int | None, int | None] | None = None,
        read_before: bool = False,
    ) -> DecodeResult:
        """:func:`read_image`, once per image while the budget lasts. The containment check
        (``root``) is repeated on every request: it is cheap and a link may change. ``size``:
        the (width, height) an earlier stage recorded for the image; another size is the reason
        ``image_changed`` (the file is not the one that stage read). ``read_before``: an earlier
        stage read this image, so a missing or unreadable file now is a storage fault
        (``OSError``: the shard is not committed without it), not the image's reason."""
        res = self._read(uri, max_pixels, storage_options, root)
        if read_before and not res.ok and res.reason in TRANSIENT_REASONS:
            raise OSError(
                errno.EIO,
                f"cannot read an image the earlier stages read ({res.reason}: {res.detail}); "
                "the shard is not committed without it",
                uri,
            )
        if res.ok and size is not None:
            h, w = res.image.shape[:2]
            if (w, h) != tuple(size):
                return _fail(IMAGE_CHANGED, f"{uri} is {w}x{h}, an earlier stage read {size[0]}x{size[1]}")
        return res

    def _read(
        self, uri: str, max_pixels: int, storage_options: dict | None, root: str | None
    ) -> DecodeResult:
        if root is not None and not inside_root(uri, root):
            return _fail("symlink_escapes_root", f"{uri} resolves outside {root}")
        key = (uri, max_pixels, root)
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        self.decodes += 1
        res = read_image(uri, max_pixels, storage_options, root)
        if res.ok and self.kept_bytes + res.image.nbytes <= self.budget_bytes:
            self._kept[key] = res
            self.kept_bytes += res.image.nbytes
        return res
