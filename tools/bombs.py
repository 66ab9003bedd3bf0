"""Decompression bombs for tests and benchmarks: images of about 1 MB whose headers claim CLAIMED x CLAIMED pixels."""

from __future__ import annotations

import io
import os
import zlib

from PIL import Image

CLAIMED = 50_000  # side each bomb claims


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_bomb(side: int = CLAIMED) -> bytes:
    """A PNG of 1 MB of compressed noise whose header claims ``side`` x ``side`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    pixels = zlib.compress(os.urandom(1_000_000), 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_bomb() -> bytes:
    """A real JPEG of 1,000 x 1,000 pixels of noise whose frame header claims CLAIMED x CLAIMED."""
    data = bytearray(_encoded(Image.frombytes("RGB", (1000, 1000), os.urandom(3_000_000)), "JPEG", quality=95))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = CLAIMED.to_bytes(2, "big") * 2
    return bytes(data)


def gif_bomb() -> bytes:
    data = bytearray(_encoded(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = CLAIMED.to_bytes(2, "little") * 2
    return bytes(data) + os.urandom(1_000_000)


def bmp_bomb() -> bytes:
    data = bytearray(_encoded(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = CLAIMED.to_bytes(4, "little") * 2
    return bytes(data) + os.urandom(1_000_000)


BOMBS = {"png": png_bomb, "jpg": jpeg_bomb, "gif": gif_bomb, "bmp": bmp_bomb}
