"""Tests of laion5b.imageformat: magic numbers of real files and of hand-made headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laion5b.imageformat import EXTENSIONS, image_extension
from tools.image_server import FORMATS, image_bytes

IMAGES = Path(__file__).resolve().parent.parent / "tools" / "images"


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """An ISO-BMFF ftyp box followed by the start of a meta box."""
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(body) + 8).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x20meta"


def test_extensions_cover_every_format() -> None:
    assert EXTENSIONS == ("jpg", "png", "gif", "webp", "bmp", "tiff", "avif", "heic")
    assert set(FORMATS) == set(EXTENSIONS)


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_real_asset_files(extension: str) -> None:
    assert image_extension((IMAGES / f"tiny.{extension}").read_bytes()) == extension


@pytest.mark.parametrize("extension", EXTENSIONS)
@pytest.mark.parametrize("size", [0, 20000, 300000])
def test_served_images_keep_their_signature(extension: str, size: int) -> None:
    assert image_extension(image_bytes("some name", extension, size)) == extension


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xdb" + bytes(20), "jpg"),
        (b"\x89PNG\r\n\x1a\n" + bytes(20), "png"),
        (b"GIF87a" + bytes(20), "gif"),
        (b"GIF89a" + bytes(20), "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"II+\x00\x08\x00\x00\x00", "tiff"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(20), "bmp"),
        (b"BM" + bytes(12) + (124).to_bytes(4, "little"), "bmp"),
        (ftyp(b"avif", b"mif1", b"miaf"), "avif"),
        (ftyp(b"avis", b"msf1"), "avif"),
        (ftyp(b"mif1", b"avif"), "avif"),
        (ftyp(b"heic", b"mif1"), "heic"),
        (ftyp(b"heix"), "heic"),
        (ftyp(b"mif1", b"heic"), "heic"),
        (ftyp(b"msf1", b"hevc"), "heic"),
    ],
)
def test_signatures(data: bytes, expected: str) -> None:
    assert image_extension(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"<!doctype html><html><body>hello</body></html>",
        b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.7\n",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"BM" + bytes(12) + (7).to_bytes(4, "little"),
        b"BMW is a car maker",
        b"GIF90a",
        ftyp(b"isom", b"iso2", b"mp41"),
        ftyp(b"qt  "),
        b"\x00\x00\x00\x08ftyp",
        b"\x00\x00\x00\x00ftypisom",
        b"NOTIMAGE" + bytes(100),
    ],
)
def test_not_images(data: bytes) -> None:
    assert image_extension(data) is None


def test_brands_far_past_the_box_start_are_ignored() -> None:
    box = (4096).to_bytes(4, "big") + b"ftypisom" + bytes(4) + b"mp41" * 100 + b"avif"
    assert image_extension(box) is None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_known_extension_or_none(data: bytes) -> None:
    assert image_extension(data) in (*EXTENSIONS, None)


@given(st.sampled_from(EXTENSIONS), st.binary(max_size=64))
def test_trailing_bytes_do_not_change_the_answer(extension: str, tail: bytes) -> None:
    assert image_extension((IMAGES / f"tiny.{extension}").read_bytes() + tail) == extension
