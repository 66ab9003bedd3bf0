"""Image format detection from magic numbers only; Content-Type and file names are never trusted."""

from __future__ import annotations

EXTENSIONS = ("jpg", "png", "gif", "webp", "bmp", "tiff", "avif", "heic")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER .. BITMAPV5HEADER
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_FTYP_SCAN_END = 256  # brands past this offset are ignored: real ftyp boxes are a few dozen bytes


def image_extension(data: bytes) -> str | None:
    """Return the extension of the image format that ``data`` starts with, or None if it is not a known image."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(_TIFF_MAGIC):
        return "tiff"
    if data.startswith(b"BM") and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if data[4:8] == b"ftyp":
        return _ftyp_extension(data)
    return None


def _ftyp_extension(data: bytes) -> str | None:
    """Classify an ISO-BMFF file by the major and compatible brands of its leading ``ftyp`` box."""
    box_size = int.from_bytes(data[:4], "big")
    end = min(box_size if box_size >= 16 else 12, len(data), _FTYP_SCAN_END)
    brands = {bytes(data[8:12])}  # bytes(): a fetched body is a bytearray, whose slices cannot go in a set
    brands.update(bytes(data[offset : offset + 4]) for offset in range(16, end - 3, 4))
    if not brands.isdisjoint(_AVIF_BRANDS):
        return "avif"
    if not brands.isdisjoint(_HEIF_BRANDS):
        return "heic"
    return None
