"""Optional processing between download and storage: filters, EXIF orientation, resize and re-encode (Pillow).

``process`` returns a ``Processed`` value for every image: ``status`` is None on success, or one of the permanent
words too_small, bad_aspect, too_many_pixels and decode_error. Modes, rounding, padding and defaults follow
img2dataset, so its command lines carry over. Sizes are checked from the header before any pixel is decoded, and
Pillow's own decompression-bomb check is never reached: images are opened through their format's plugin, which reads
the header only. The function keeps no state, so threads may share it; Pillow releases the GIL while it decodes,
resizes and encodes.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from PIL import (
    AvifImagePlugin,
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)
from PIL.ExifTags import Base

from laion5b.config import ENCODE_FORMATS, QUALITY_RANGES, RESIZE_MODES, Config

PILLOW_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS): the area limit by default
STATUSES = ("too_small", "bad_aspect", "too_many_pixels", "decode_error")
_MESSAGE_CHARS = 200
_WHITE = 255
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PILLOW_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_OPENERS: dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]] = {
    "jpg": JpegImagePlugin.jpeg_factory,
    "png": PngImagePlugin.PngImageFile,
    "gif": GifImagePlugin.GifImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
    "avif": AvifImagePlugin.AvifImageFile,
}
_UPRIGHT = {  # EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

Size = tuple[int, int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProcessPolicy:
    """What to do with each image; the worker builds it from the settings (``process_policy``)."""

    resize_mode: str = "no"
    image_size: int = 256
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    skip_reencode: bool = False
    min_image_size: int = 0  # 0: off
    max_aspect_ratio: float = 0.0  # 0: off
    max_image_area: int = 0  # 0: PILLOW_MAX_PIXELS when pixels are decoded, off with resize_mode "no"
    one_format: bool = False  # resize_mode "no": images not in encode_format are re-encoded to it, the others kept

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {', '.join(ENCODE_FORMATS)}, got {self.encode_format!r}")
        low, high = QUALITY_RANGES[self.encode_format]
        if not low <= self.encode_quality <= high:
            raise ValueError(f"encode_quality for {self.encode_format} must be {low}-{high}, got {self.encode_quality}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        if self.min_image_size < 0 or self.max_image_area < 0:
            raise ValueError(
                f"min_image_size and max_image_area must not be negative, got {self.min_image_size}, "
                f"{self.max_image_area}"
            )
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be 0 (off) or at least 1, got {self.max_aspect_ratio}")

    @property
    def active(self) -> bool:
        """Whether images go through ``process`` at all: a resize, a filter set explicitly, or one format."""
        return self.resize_mode != "no" or self.filtered or self.one_format

    @property
    def filtered(self) -> bool:
        """Whether a filter is set explicitly."""
        return bool(self.min_image_size or self.max_aspect_ratio or self.max_image_area)

    @property
    def decode_area_limit(self) -> int:
        """Most pixels an image may have when it is decoded."""
        return self.max_image_area or PILLOW_MAX_PIXELS


@dataclass(frozen=True)
class Processed:
    """Outcome of one image: the bytes to store with their sizes and hashes, or a status and a one-line message."""

    data: bytes | None
    extension: str | None
    status: str | None
    error_msg: str = ""
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_sha256: str = ""
    sha256: str = ""
    original_format: str = ""
    """The extension of the image as downloaded ('' where it was not processed)."""


@dataclass(frozen=True)
class _Plan:
    """Where the pixels go, in upright coordinates, following img2dataset's rules."""

    scaled: Size  # the whole image after scaling
    crop: tuple[int, int, int, int]  # the region of the scaled image that is kept
    canvas: Size  # the output: the crop, padded on white around it when larger
    resized: bool  # img2dataset resized (so it re-encodes whatever skip_reencode says)
    downscale: bool


class _Refused(Exception):
    """An image that a filter turns away, carried out of nested helpers."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def process_policy(config: Config) -> ProcessPolicy:
    """The processing that the settings ask for."""
    return ProcessPolicy(
        resize_mode=config.resize_mode,
        image_size=config.image_size,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.encode_quality,
        skip_reencode=config.skip_reencode,
        min_image_size=config.min_image_size,
        max_aspect_ratio=config.max_aspect_ratio,
        max_image_area=config.max_image_area,
        one_format=config.output_format == "webdataset" and not config.webdataset_keep_format,
    )


def process(data: bytes, extension: str, policy: ProcessPolicy) -> Processed:
    """Filter, resize and re-encode one downloaded image (``extension`` as ``image_extension`` named it)."""
    try:
        if policy.resize_mode == "no":
            return _as_downloaded(data, extension, policy)
        return _reencoded(data, extension, policy)
    except _Refused as refusal:
        return Processed(None, None, refusal.status, str(refusal))
    except _BOMBS as error:
        return Processed(None, None, "too_many_pixels", _one_line(error))
    except _DECODE_ERRORS as error:
        return Processed(None, None, "decode_error", _one_line(error))


def _as_downloaded(data: bytes, extension: str, policy: ProcessPolicy) -> Processed:
    """The bytes as downloaded; only the filters set explicitly apply, to the size the header gives. With
    ``one_format``, an image in another format than ``encode_format`` is re-encoded to it instead."""
    if policy.one_format and extension != policy.encode_format:
        return _converted(data, extension, policy)
    try:
        image = _open(data, extension)
        size = _upright_size(image.size, _orientation(image))
    except (*_DECODE_ERRORS, *_BOMBS):
        if policy.filtered:
            raise
        size = None
    if size is not None:
        _check(size, policy, policy.max_image_area)
    width, height = size or (None, None)
    digest = hashlib.sha256(data).hexdigest()
    return Processed(data, extension, None, "", width, height, width, height, digest, digest, extension)


def _converted(data: bytes, extension: str, policy: ProcessPolicy) -> Processed:
    """The image at its size, upright, transparency on white, encoded to ``encode_format``."""
    image = _open(data, extension)
    orientation = _orientation(image)
    size = _upright_size(image.size, orientation)
    _check(size, policy, policy.decode_area_limit)
    whole = _Plan(size, (0, 0, *size), size, False, False)
    return _encoded(image, orientation, size, whole, data, extension, policy)


def _reencoded(data: bytes, extension: str, policy: ProcessPolicy) -> Processed:
    image = _open(data, extension)
    orientation = _orientation(image)
    original = _upright_size(image.size, orientation)
    _check(original, policy, policy.decode_area_limit)
    plan = _plan(original, policy)
    if plan.canvas[0] * plan.canvas[1] > max(policy.max_image_area, PILLOW_MAX_PIXELS):  # an upscale of a thin image
        raise _Refused("too_many_pixels", f"output of {plan.canvas[0]} x {plan.canvas[1]} pixels is over the limit")
    if policy.skip_reencode and _keeps_its_bytes(image, extension, orientation, plan, policy):
        digest = hashlib.sha256(data).hexdigest()
        return Processed(data, extension, None, "", *original, *original, digest, digest, extension)
    return _encoded(image, orientation, original, plan, data, extension, policy)


def _encoded(
    image: ImageFile.ImageFile,
    orientation: int,
    original: Size,
    plan: _Plan,
    data: bytes,
    extension: str,
    policy: ProcessPolicy,
) -> Processed:
    """The image as the plan makes it, encoded to ``encode_format``; ``data`` and ``extension`` as downloaded."""
    upright = _pixels(image, orientation, original, plan)
    encoded = _encode(upright, policy)
    digest, new_digest = hashlib.sha256(data).hexdigest(), hashlib.sha256(encoded).hexdigest()
    return Processed(encoded, policy.encode_format, None, "", *upright.size, *original, digest, new_digest, extension)


def _open(data: bytes, extension: str) -> ImageFile.ImageFile:
    """The image with its header read and no pixel decoded, through the plugin of its format."""
    opener = _OPENERS.get(extension)
    if opener is None:
        raise OSError(f"no decoder for {extension}")
    image = opener(io.BytesIO(data))
    if min(image.size) < 1:
        raise ValueError(f"image of {image.size[0]} x {image.size[1]} pixels")
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) that the header declares; 1 when there is none."""
    if isinstance(image, PngImagePlugin.PngImageFile) and "exif" not in image.info:
        return 1  # EXIF after the pixel data: reading it would decode the image
    try:
        value = image.getexif().get(Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1
    return value if value in _UPRIGHT else 1


def _upright_size(size: Size, orientation: int) -> Size:
    return (size[1], size[0]) if orientation >= 5 else size


def _check(size: Size, policy: ProcessPolicy, area_limit: int) -> None:
    """Apply the filters in img2dataset's order: smaller side, area, aspect ratio."""
    width, height = size
    if min(width, height) < policy.min_image_size:
        raise _Refused("too_small", f"{width} x {height} pixels: smaller side under {policy.min_image_size}")
    if area_limit and width * height > area_limit:
        raise _Refused("too_many_pixels", f"{width} x {height} pixels is over {area_limit}")
    ratio = max(width, height) / min(width, height)
    if policy.max_aspect_ratio and ratio > policy.max_aspect_ratio:
        raise _Refused(
            "bad_aspect", f"{width} x {height} pixels: aspect ratio {ratio:.2f} over {policy.max_aspect_ratio:g}"
        )


def _plan(size: Size, policy: ProcessPolicy) -> _Plan:
    """Scaled size, crop and padding of an upright image of ``size``, rounded as img2dataset rounds them."""
    width, height = size
    target = policy.image_size
    side = min(size) if policy.resize_mode in ("keep_ratio", "center_crop") else max(size)
    downscale = side > target
    if policy.resize_only_if_bigger and not downscale:
        return _Plan(size, (0, 0, width, height), size, False, False)
    scale = target / float(side)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale))) if scale != 1.0 else size
    crop = (0, 0, *scaled)
    canvas = scaled
    if policy.resize_mode == "center_crop":
        left, top = (scaled[0] - target) // 2, (scaled[1] - target) // 2
        crop = (left, top, left + target, top + target)
        canvas = (target, target)
    elif policy.resize_mode == "border":
        canvas = (max(scaled[0], target), max(scaled[1], target))
    return _Plan(scaled, crop, canvas, True, downscale)


def _keeps_its_bytes(image: Image.Image, extension: str, orientation: int, plan: _Plan, policy: ProcessPolicy) -> bool:
    """Whether skip_reencode keeps the downloaded bytes: same format, nothing to resize, rotate or flatten."""
    return (
        extension == policy.encode_format
        and not plan.resized
        and orientation == 1
        and image.mode in ("RGB", "L")
        and "transparency" not in image.info
        and not getattr(image, "is_animated", False)
    )


def _pixels(image: ImageFile.ImageFile, orientation: int, original: Size, plan: _Plan) -> Image.Image:
    """Decode what the plan needs and return the output image, upright, without transparency, padded on white.

    The scaling is done in the file's own orientation and only the small result is turned upright, so a JPEG can be
    decoded at a reduced scale (draft mode) and the crop never costs a full-size intermediate.
    """
    scaled_width, scaled_height = plan.scaled
    left, top, right, bottom = plan.crop
    box = (
        left * original[0] / scaled_width,
        top * original[1] / scaled_height,
        right * original[0] / scaled_width,
        bottom * original[1] / scaled_height,
    )
    raw_box = _raw_box(box, original, orientation)
    raw_output = _upright_size((right - left, bottom - top), orientation)
    if plan.downscale:
        raw_width = image.size[0]
        drafted = image.draft(None, _upright_size(plan.scaled, orientation))
        if drafted is not None:
            factor = drafted[1][2] / raw_width
            raw_box = (raw_box[0] * factor, raw_box[1] * factor, raw_box[2] * factor, raw_box[3] * factor)
    flat = _flattened(image)
    if raw_box != (0, 0, *flat.size) or raw_output != flat.size:
        resample = Image.Resampling.BOX if plan.downscale else Image.Resampling.LANCZOS
        flat = flat.resize(raw_output, resample, box=raw_box)
    if orientation in _UPRIGHT:
        flat = flat.transpose(_UPRIGHT[orientation])
    if plan.canvas == flat.size:
        return flat
    canvas = Image.new(flat.mode, plan.canvas, (_WHITE,) * len(flat.getbands()))
    canvas.paste(flat, ((plan.canvas[0] - flat.size[0]) // 2, (plan.canvas[1] - flat.size[1]) // 2))
    return canvas


def _raw_box(box: Box, upright: Size, orientation: int) -> Box:
    """The region of the file's pixels (as stored, before EXIF orientation) that shows as ``box`` upright."""
    x1, y1, x2, y2 = box
    width, height = _upright_size(upright, orientation)  # the stored size
    return {
        1: (x1, y1, x2, y2),
        2: (width - x2, y1, width - x1, y2),
        3: (width - x2, height - y2, width - x1, height - y1),
        4: (x1, height - y2, x2, height - y1),
        5: (y1, x1, y2, x2),
        6: (y1, height - x2, y2, height - x1),
        7: (width - y2, height - x2, width - y1, height - x1),
        8: (width - y2, x1, width - y1, x2),
    }[orientation]


def _flattened(image: Image.Image) -> Image.Image:
    """The image as RGB or L (decoded), with any transparency laid on white as img2dataset does."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (_WHITE, _WHITE, _WHITE))
        white.paste(rgba, mask=rgba)
        return white
    if image.mode in ("RGB", "L"):
        image.load()
        return image
    if image.mode.startswith("I"):  # 16- or 32-bit grey: keep the top 8 bits of 16
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("1", "F"):
        return image.convert("L")
    return image.convert("RGB")


def _encode(image: Image.Image, policy: ProcessPolicy) -> bytes:
    buffer = io.BytesIO()
    option = "compress_level" if policy.encode_format == "png" else "quality"
    image.save(buffer, _PILLOW_FORMATS[policy.encode_format], **{option: policy.encode_quality})
    return buffer.getvalue()


def _one_line(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:_MESSAGE_CHARS]
