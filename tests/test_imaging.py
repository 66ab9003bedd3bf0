"""Tests of laion5b.imaging: every mode and filter on images of known sizes, formats, bombs, memory and threads.

Expected sizes are written out by hand from img2dataset's rules: the smaller (keep_ratio, center_crop) or larger
(keep_ratio_largest, border) side becomes image_size, the other side is ``round(side * image_size / float(that))``
(half to even), crops and pads put the odd pixel at the bottom and right.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

import setting
from laion5b import config
from laion5b.imageformat import image_extension
from laion5b.imaging import STATUSES, Processed, ProcessPolicy, process, process_policy
from laion5b.tasks import is_transient
from tools.bombs import BOMBS, png_bomb

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tools" / "images"
RED, GREEN, BLUE, YELLOW, MAGENTA, WHITE = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (255, 255, 255),
)
PIXELS_LIMIT = 89_478_485  # Pillow's own limit, int(1024 * 1024 * 1024 // 4 // 3)
PNG = {"encode_format": "png", "encode_quality": 1}  # lossless output, for exact pixel checks

pytestmark = pytest.mark.filterwarnings("error")  # a DecompressionBombWarning (or any other) fails the test


def encoded(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int, height: int) -> Image.Image:
    """A smooth RGB picture of the given size."""
    red = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (red, red.transpose(Image.Transpose.ROTATE_90).resize((width, height)), red))


def run(data: bytes, extension: str, **policy: object) -> Processed:
    result = process(data, extension, ProcessPolicy(**policy))
    assert result.status is None, result.error_msg
    return result


def opened(result: Processed) -> Image.Image:
    image = Image.open(io.BytesIO(result.data))
    assert image.size == (result.width, result.height)
    return image.convert("RGB")


def near(color: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=True))


# --- modes and sizes ---

SIZES = [
    # (width, height), mode, resize_only_if_bigger, expected output
    ((1000, 600), "keep_ratio", False, (427, 256)),  # 1000 * 256 / 600 = 426.67
    ((1000, 600), "keep_ratio_largest", False, (256, 154)),  # 600 * 0.256 = 153.6
    ((1000, 600), "center_crop", False, (256, 256)),
    ((1000, 600), "border", False, (256, 256)),
    ((600, 1000), "keep_ratio", False, (256, 427)),
    ((600, 1000), "keep_ratio_largest", False, (154, 256)),
    ((600, 1000), "center_crop", False, (256, 256)),
    ((600, 1000), "border", False, (256, 256)),
    ((512, 512), "keep_ratio", False, (256, 256)),
    ((512, 512), "keep_ratio_largest", False, (256, 256)),
    ((512, 512), "center_crop", False, (256, 256)),
    ((512, 512), "border", False, (256, 256)),
    ((512, 253), "keep_ratio_largest", False, (256, 126)),  # 126.5 rounds half to even, not up
    ((512, 255), "keep_ratio_largest", False, (256, 128)),  # 127.5 rounds to 128
    ((100, 50), "keep_ratio", False, (512, 256)),  # smaller than image_size: scaled up
    ((100, 50), "keep_ratio_largest", False, (256, 128)),
    ((100, 50), "center_crop", False, (256, 256)),
    ((100, 50), "border", False, (256, 256)),
    ((100, 50), "keep_ratio", True, (100, 50)),  # ... unless resize_only_if_bigger
    ((100, 50), "keep_ratio_largest", True, (100, 50)),
    ((100, 50), "center_crop", True, (100, 50)),
    ((100, 50), "border", True, (100, 50)),
    ((300, 200), "keep_ratio", True, (300, 200)),  # smaller side 200 is not bigger
    ((300, 200), "keep_ratio_largest", True, (256, 171)),  # larger side 300 is: 200 * 256 / 300 = 170.67
    ((300, 200), "center_crop", True, (300, 200)),
    ((300, 200), "border", True, (256, 256)),
]


@pytest.mark.parametrize(("size", "mode", "only_if_bigger", "expected"), SIZES)
def test_output_sizes_follow_img2dataset(
    size: tuple[int, int], mode: str, only_if_bigger: bool, expected: tuple[int, int]
) -> None:
    data = encoded(photo(*size))
    result = run(data, "jpg", resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    assert (result.width, result.height) == expected
    assert (result.original_width, result.original_height) == size
    assert result.extension == "jpg"
    assert image_extension(result.data) == "jpg"
    assert Image.open(io.BytesIO(result.data)).size == expected
    assert result.original_sha256 == hashlib.sha256(data).hexdigest()
    assert result.sha256 == hashlib.sha256(result.data).hexdigest() != result.original_sha256


def test_image_size_is_a_setting() -> None:
    result = run(encoded(photo(1000, 600)), "jpg", resize_mode="keep_ratio", image_size=512)
    assert (result.width, result.height) == (853, 512)  # 1000 * 512 / 600 = 853.33


def test_border_pads_on_white_with_the_odd_row_at_the_bottom() -> None:
    black = Image.new("RGB", (512, 250), (0, 0, 0))
    result = run(encoded(black, "PNG"), "png", resize_mode="border", **PNG)
    image = opened(result)
    assert image.size == (256, 256)  # scaled to 256 x 125, then 65 rows above and 66 below
    assert [image.getpixel((128, y)) for y in (64, 65, 189, 190)] == [WHITE, (0, 0, 0), (0, 0, 0), WHITE]


def column_coded(width: int, height: int) -> Image.Image:
    """Each pixel says where it is: red + 256 * green is its column, blue its row."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, x // 256, y) for y in range(height) for x in range(width)])
    return image


def test_center_crop_keeps_the_middle_with_the_odd_column_at_the_right() -> None:
    image = opened(run(encoded(column_coded(401, 256), "PNG"), "png", resize_mode="center_crop", **PNG))
    assert image.size == (256, 256)  # no scaling: the smaller side is already 256; (401 - 256) // 2 = 72
    assert image.getpixel((0, 0)) == (72, 0, 0)
    assert image.getpixel((255, 200)) == (327 % 256, 1, 200)


def test_no_mode_keeps_the_downloaded_bytes_and_reads_the_size_from_the_header() -> None:
    data = encoded(photo(300, 200))
    result = run(data, "jpg")
    assert result.data is data
    assert (result.extension, result.width, result.height) == ("jpg", 300, 200)
    assert (result.original_width, result.original_height) == (300, 200)
    assert result.sha256 == result.original_sha256 == hashlib.sha256(data).hexdigest()


def test_no_mode_stores_what_it_cannot_read_when_no_filter_is_set() -> None:
    result = run(b"\xff\xd8\xff" + b"not really a jpeg", "jpg")
    assert (result.width, result.height, result.data) == (None, None, b"\xff\xd8\xff" + b"not really a jpeg")
    refused = process(b"\xff\xd8\xff" + b"not really a jpeg", "jpg", ProcessPolicy(min_image_size=1))
    assert refused.status == "decode_error"


# --- EXIF orientation, transparency, palettes, animation ---

INVERSE = {  # the transposition that makes the stored pixels of an upright picture, for each EXIF orientation
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def framed_quadrants() -> Image.Image:
    """400 x 200, upright: red bands left and right, a centre square of four coloured quadrants."""
    image = Image.new("RGB", (400, 200), RED)
    for (x, y), color in zip([(100, 0), (200, 0), (100, 100), (200, 100)], [GREEN, BLUE, YELLOW, MAGENTA], strict=True):
        image.paste(color, (x, y, x + 100, y + 100))
    return image


def with_orientation(upright: Image.Image, orientation: int) -> bytes:
    stored = upright.transpose(INVERSE[orientation]) if orientation in INVERSE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_the_crop(orientation: int) -> None:
    result = run(with_orientation(framed_quadrants(), orientation), "jpg", resize_mode="center_crop", image_size=100)
    assert (result.original_width, result.original_height) == (400, 200)
    image = opened(result)
    assert image.size == (100, 100)
    quadrants = [image.getpixel(point) for point in [(25, 25), (75, 25), (25, 75), (75, 75)]]
    assert all(map(near, quadrants, [GREEN, BLUE, YELLOW, MAGENTA])), quadrants
    assert not any(near(image.getpixel((x, 50)), RED, 60) for x in (1, 98))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_keeps_the_odd_pixel_of_a_crop_where_img2dataset_puts_it(orientation: int) -> None:
    upright = column_coded(401, 256)
    stored = upright.transpose(INVERSE[orientation]) if orientation in INVERSE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(stored, "PNG", exif=exif)
    image = opened(run(data, "png", resize_mode="center_crop", **PNG))
    assert image.size == (256, 256)
    assert (image.getpixel((0, 0)), image.getpixel((255, 255))) == ((72, 0, 0), (327 % 256, 1, 255))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_turned_photo_is_measured_upright(orientation: int) -> None:
    data = with_orientation(photo(200, 300), orientation)
    assert Image.open(io.BytesIO(data)).size == (300, 200)
    result = run(data, "jpg", resize_mode="keep_ratio", image_size=100)
    assert (result.original_width, result.original_height) == (200, 300)
    assert (result.width, result.height) == (100, 150)


def test_transparency_goes_on_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (32, 0, 64, 32))
    rgba.paste((0, 0, 0, 128), (32, 32, 64, 64))
    image = opened(run(encoded(rgba, "PNG"), "png", resize_mode="keep_ratio", image_size=64, **PNG))
    assert image.getpixel((10, 10)) == WHITE
    assert image.getpixel((40, 10)) == RED
    assert image.getpixel((40, 40)) == (127, 127, 127)  # black at alpha 128 over white: 255 - 128


def test_grey_with_alpha_goes_on_white() -> None:
    grey = Image.new("LA", (64, 64), (0, 0))
    image = opened(run(encoded(grey, "PNG"), "png", resize_mode="border", image_size=32, **PNG))
    assert image.getpixel((16, 16)) == WHITE


def test_palette_images_keep_their_colours_and_lose_their_transparency() -> None:
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    palette.paste(1, (0, 0, 32, 64))
    palette.paste(2, (32, 0, 64, 64))
    plain = opened(run(encoded(palette, "PNG"), "png", resize_mode="keep_ratio", image_size=64, **PNG))
    assert (plain.getpixel((10, 10)), plain.getpixel((50, 10))) == (RED, BLUE)
    see_through = opened(
        run(encoded(palette, "PNG", transparency=2), "png", resize_mode="keep_ratio", image_size=64, **PNG)
    )
    assert (see_through.getpixel((10, 10)), see_through.getpixel((50, 10))) == (RED, WHITE)


def test_only_the_first_frame_of_an_animation_is_kept() -> None:
    frames = [Image.new("RGB", (80, 60), color) for color in (RED, GREEN, BLUE)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    result = run(data, "gif", resize_mode="keep_ratio_largest", image_size=40)
    assert (result.extension, result.width, result.height) == ("jpg", 40, 30)
    image = opened(result)
    assert near(image.getpixel((20, 15)), RED)
    assert getattr(Image.open(io.BytesIO(result.data)), "n_frames", 1) == 1
    assert run(data, "gif").data is data  # resize_mode "no" keeps the animation


@pytest.mark.parametrize("mode", ["center_crop", "border"])
def test_grey_images_stay_grey(mode: str) -> None:
    result = run(encoded(Image.new("L", (300, 150), 0), "PNG"), "png", resize_mode=mode, **PNG)
    image = Image.open(io.BytesIO(result.data))
    assert (image.mode, image.size) == ("L", (256, 256))
    assert image.getpixel((128, 128)) == 0
    assert image.getpixel((128, 0)) == (255 if mode == "border" else 0)


@pytest.mark.parametrize("mode", ["I;16", "1", "CMYK"])
def test_other_pixel_modes_are_converted(mode: str) -> None:
    fmt, extension = ("JPEG", "jpg") if mode == "CMYK" else ("PNG", "png")
    result = run(encoded(Image.new(mode, (40, 30)), fmt), extension, resize_mode="keep_ratio", image_size=60)
    assert (result.width, result.height) == (80, 60)
    assert Image.open(io.BytesIO(result.data)).mode in ("L", "RGB")


@pytest.mark.parametrize("extension", ["jpg", "png", "gif", "webp", "bmp", "tiff", "avif"])
def test_every_decodable_format_of_the_fetcher(extension: str) -> None:
    data = (ASSETS / f"tiny.{extension}").read_bytes()
    result = run(data, extension, resize_mode="keep_ratio_largest", image_size=32)
    assert max(result.width, result.height) == 32
    assert image_extension(result.data) == "jpg"


def test_heic_is_a_decode_error_when_pixels_are_needed() -> None:
    data = (ASSETS / "tiny.heic").read_bytes()
    assert process(data, "heic", ProcessPolicy(resize_mode="center_crop")).status == "decode_error"
    assert run(data, "heic").data is data


# --- one format (webdataset output with resize_mode "no") ---


@pytest.mark.parametrize("extension", ["png", "gif", "webp", "bmp", "tiff", "avif"])
def test_one_format_reencodes_other_formats_at_their_size(extension: str) -> None:
    data = (ASSETS / f"tiny.{extension}").read_bytes()
    original = Image.open(io.BytesIO(data))
    result = run(data, extension, one_format=True)
    assert (result.extension, image_extension(result.data), result.original_format) == ("jpg", "jpg", extension)
    assert (result.width, result.height) == (result.original_width, result.original_height) == original.size
    assert result.sha256 == hashlib.sha256(result.data).hexdigest() != result.original_sha256
    assert result.original_sha256 == hashlib.sha256(data).hexdigest()


def test_one_format_keeps_the_bytes_of_images_already_in_it() -> None:
    data = with_orientation(framed_quadrants(), 6)  # kept as it is, orientation tag and all
    result = run(data, "jpg", one_format=True)
    assert (result.data, result.extension, result.original_format) == (data, "jpg", "jpg")
    assert (result.width, result.height) == (400, 200)  # upright
    as_png = run(data, "jpg", one_format=True, **PNG)
    assert (as_png.extension, as_png.original_format, opened(as_png).size) == ("png", "jpg", (400, 200))


def test_one_format_turns_images_upright_and_lays_transparency_on_white() -> None:
    stored = framed_quadrants().transpose(INVERSE[8])
    exif = Image.Exif()
    exif[0x0112] = 8
    image = opened(run(encoded(stored, "WEBP", lossless=True, exif=exif), "webp", one_format=True, **PNG))
    assert image.size == (400, 200) and near(image.getpixel((150, 50)), GREEN)
    clear = opened(run(encoded(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG"), "png", one_format=True))
    assert near(clear.getpixel((5, 5)), WHITE)


def test_one_format_refuses_what_it_cannot_convert() -> None:
    heic = (ASSETS / "tiny.heic").read_bytes()
    assert process(heic, "heic", ProcessPolicy(one_format=True)).status == "decode_error"
    garbage = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    assert process(garbage, "png", ProcessPolicy(one_format=True)).status == "decode_error"
    assert run(b"\xff\xd8\xff" + b"not really a jpeg", "jpg", one_format=True).width is None  # kept: no filter
    bomb = png_bomb()
    assert process(bomb, "png", ProcessPolicy(one_format=True)).status == "too_many_pixels"


# --- encoding ---


@pytest.mark.parametrize("encode_format", ["jpg", "png", "webp"])
def test_encode_formats(encode_format: str) -> None:
    quality = 9 if encode_format == "png" else 80
    result = run(
        encoded(photo(600, 400)),
        "jpg",
        resize_mode="keep_ratio",
        encode_format=encode_format,
        encode_quality=quality,
    )
    assert result.extension == encode_format
    assert image_extension(result.data) == encode_format
    assert (result.width, result.height) == (384, 256)


@pytest.mark.parametrize(("encode_format", "low", "high"), [("jpg", 20, 95), ("webp", 20, 95), ("png", 9, 0)])
def test_encode_quality_is_passed_to_the_encoder(encode_format: str, low: int, high: int) -> None:
    data = encoded(photo(256, 256), "PNG")
    sizes = [
        len(run(data, "png", resize_mode="center_crop", encode_format=encode_format, encode_quality=q).data)
        for q in (low, high)
    ]
    assert sizes[0] < sizes[1]


def test_skip_reencode_keeps_the_bytes_of_an_image_that_needs_no_change() -> None:
    data = encoded(photo(200, 100))
    kept = run(data, "jpg", resize_mode="keep_ratio", resize_only_if_bigger=True, skip_reencode=True)
    assert kept.data is data
    assert (kept.width, kept.height, kept.sha256) == (200, 100, kept.original_sha256)
    again = run(data, "jpg", resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert again.data != data and (again.width, again.height) == (200, 100)


@pytest.mark.parametrize(
    ("data", "extension", "policy"),
    [
        (encoded(photo(200, 100), "PNG"), "png", {}),  # another format than encode_format
        (encoded(photo(800, 600)), "jpg", {}),  # needs a resize
        (with_orientation(photo(200, 100), 6), "jpg", {}),  # needs turning upright
        (encoded(Image.new("RGBA", (50, 50)), "PNG"), "png", PNG),  # needs flattening
    ],
)
def test_skip_reencode_still_reencodes_what_changes(data: bytes, extension: str, policy: dict[str, object]) -> None:
    result = run(data, extension, resize_mode="keep_ratio", resize_only_if_bigger=True, skip_reencode=True, **policy)
    assert result.data != data
    assert result.sha256 != result.original_sha256


# --- filters ---


@pytest.mark.parametrize("mode", ["no", "center_crop"])
@pytest.mark.parametrize(
    ("policy", "status"),
    [
        ({"min_image_size": 60}, "too_small"),
        ({"min_image_size": 50}, None),
        ({"max_aspect_ratio": 1.9}, "bad_aspect"),
        ({"max_aspect_ratio": 2}, None),  # 100 x 50 is exactly 2
        ({"max_image_area": 4999}, "too_many_pixels"),
        ({"max_image_area": 5000}, None),
    ],
)
def test_filters(mode: str, policy: dict[str, object], status: str | None) -> None:
    result = process(encoded(photo(100, 50)), "jpg", ProcessPolicy(resize_mode=mode, **policy))
    assert result.status == status
    assert (result.data is None) == (status is not None)
    if status:
        assert result.error_msg and "\n" not in result.error_msg
        assert not is_transient(status)


def test_every_status_is_permanent() -> None:
    assert not any(is_transient(status) for status in STATUSES)


@pytest.mark.parametrize(
    ("settings", "active"),
    [
        ({}, False),
        ({"encode_format": "webp", "skip_reencode": True}, False),  # no resize: encoding settings alone do nothing
        ({"resize_mode": "border"}, True),
        ({"min_image_size": 10}, True),
        ({"max_aspect_ratio": 3.0}, True),
        ({"max_image_area": 10**6}, True),
        ({"one_format": True}, True),
    ],
)
def test_the_worker_skips_processing_only_when_nothing_is_asked(settings: dict, active: bool) -> None:
    assert ProcessPolicy(**settings).active is active


def test_an_upscale_to_too_many_pixels_is_refused() -> None:
    thread = encoded(Image.new("RGB", (3000, 1)), "PNG")  # keep_ratio would make it 768000 x 256
    assert process(thread, "png", ProcessPolicy(resize_mode="keep_ratio")).status == "too_many_pixels"
    assert run(thread, "png", resize_mode="keep_ratio_largest").height == 1  # 0.085 rounds to 0: one row kept


# --- decompression bombs, broken files, memory and time ---


@pytest.mark.parametrize("extension", BOMBS)
def test_a_bomb_is_refused_from_its_header_quickly_and_in_little_memory(extension: str) -> None:
    data = BOMBS[extension]()
    assert len(data) > 900_000
    policy = ProcessPolicy(resize_mode="center_crop")
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        result = process(data, extension, policy)
        seconds.append(time.perf_counter() - started)
        assert result.status == "too_many_pixels", result.error_msg
    tracemalloc.start()
    process(data, extension, policy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert min(seconds) < 0.050
    assert peak < 20 * 1024 * 1024
    assert process(data, extension, ProcessPolicy(max_image_area=PIXELS_LIMIT)).status == "too_many_pixels"
    assert run(data, extension).data is data  # resize_mode "no" with no filter set: stored as downloaded


def test_pillows_limit_is_the_default_area_limit_and_raises_no_warning() -> None:
    assert Image.MAX_IMAGE_PIXELS == PIXELS_LIMIT
    data = png_bomb(10_000)  # 100 M pixels: Pillow's own check would only warn
    assert process(data, "png", ProcessPolicy(resize_mode="keep_ratio")).status == "too_many_pixels"
    with pytest.raises(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(data))  # what the test would see, had the module let Pillow check


def test_a_truncated_jpeg_is_a_decode_error() -> None:
    data = encoded(photo(800, 600))
    result = process(data[: len(data) // 2], "jpg", ProcessPolicy(resize_mode="center_crop"))
    assert result.status == "decode_error"
    assert result.error_msg and "\n" not in result.error_msg


@pytest.mark.parametrize("extension", ["jpg", "png", "webp", "gif"])
def test_garbage_is_a_decode_error(extension: str) -> None:
    assert process(os.urandom(5000), extension, ProcessPolicy(resize_mode="keep_ratio")).status == "decode_error"


PEAK_SCRIPT = """
import json, sys
from laion5b.imaging import ProcessPolicy, process
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's at fork time)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
crop = ProcessPolicy(resize_mode="center_crop")
bombs = [(open(path, "rb").read(), ext) for path, ext in json.loads(sys.argv[1])]
large_jpeg = open(sys.argv[2], "rb").read()
large_png = open(sys.argv[3], "rb").read()
assert process(large_jpeg[:3000], "jpg", crop).status == "decode_error"  # warm up the decoders
before = peak()
assert all(process(data, ext, crop).status == "too_many_pixels" for data, ext in bombs)
after_bombs = peak()
assert process(large_jpeg, "jpg", crop).width == 256
after_jpeg = peak()
assert process(large_png, "png", crop).width == 256
print(json.dumps([after_bombs - before, after_jpeg - before, peak() - before]))
"""


def test_peak_memory_of_bombs_and_of_a_drafted_jpeg(tmp_path: Path) -> None:
    """Peak RSS of a fresh process (Linux): Pillow's pixel buffers are C allocations that tracemalloc cannot see.

    The last figure is the control: a 3,000 x 3,000 PNG decoded in full must show, or the measure is blind.
    """
    bombs = []
    for extension, make in BOMBS.items():
        path = tmp_path / f"bomb.{extension}"
        path.write_bytes(make())
        bombs.append((str(path), extension))
    large_jpeg = tmp_path / "large.jpg"
    large_jpeg.write_bytes(encoded(photo(4000, 3000)))  # 36 MB of pixels, 0.6 MB when drafted to 1/8
    large_png = tmp_path / "large.png"
    large_png.write_bytes(encoded(Image.new("RGB", (3000, 3000), (20, 40, 60)), "PNG", compress_level=1))
    output = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps(bombs), str(large_jpeg), str(large_png)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    bombs_peak, jpeg_peak, control_peak = json.loads(output.stdout)
    megabyte = 1024 * 1024
    assert bombs_peak < 20 * megabyte
    assert jpeg_peak < 20 * megabyte
    assert control_peak > 20 * megabyte


# --- threads ---


def test_threads_get_the_results_of_a_single_thread() -> None:
    cases = [
        (encoded(photo(900, 700)), "jpg", ProcessPolicy(resize_mode="center_crop")),
        (encoded(photo(700, 900), "PNG"), "png", ProcessPolicy(resize_mode="border", encode_format="webp")),
        (with_orientation(photo(640, 480), 6), "jpg", ProcessPolicy(resize_mode="keep_ratio", image_size=128)),
        (png_bomb(), "png", ProcessPolicy(resize_mode="keep_ratio")),
    ]
    expected = [process(*case) for case in cases]
    mismatches: list[int] = []

    def work(offset: int) -> None:
        for round_ in range(6):
            index = (offset + round_) % len(cases)
            if process(*cases[index]) != expected[index]:
                mismatches.append(index)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert mismatches == []


# --- settings ---


def test_settings_build_the_policy() -> None:
    loaded = config.load(
        setting,
        {
            "LAION_RESIZE_MODE": "center_crop",
            "LAION_IMAGE_SIZE": "512",
            "LAION_RESIZE_ONLY_IF_BIGGER": "true",
            "LAION_ENCODE_FORMAT": "webp",
            "LAION_ENCODE_QUALITY": "90",
            "LAION_SKIP_REENCODE": "yes",
            "LAION_MIN_IMAGE_SIZE": "64",
            "LAION_MAX_ASPECT_RATIO": "3.5",
            "LAION_MAX_IMAGE_AREA": "50_000_000",
        },
    )
    assert process_policy(loaded) == ProcessPolicy("center_crop", 512, True, "webp", 90, True, 64, 3.5, 50_000_000)


def test_default_settings_keep_the_downloaded_bytes() -> None:
    assert process_policy(config.load(setting, {})) == ProcessPolicy()


@pytest.mark.parametrize(
    ("environ", "one_format"),
    [
        ({"LAION_OUTPUT_FORMAT": "webdataset"}, True),
        ({"LAION_OUTPUT_FORMAT": "webdataset", "LAION_WEBDATASET_KEEP_FORMAT": "true"}, False),
        ({"LAION_OUTPUT_FORMAT": "files"}, False),
    ],
)
def test_webdataset_output_asks_for_one_image_format_by_default(environ: dict[str, str], one_format: bool) -> None:
    assert process_policy(config.load(setting, environ)).one_format is one_format


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"LAION_RESIZE_MODE": "fixed"}, "LAION_RESIZE_MODE"),
        ({"LAION_ENCODE_FORMAT": "gif"}, "LAION_ENCODE_FORMAT"),
        ({"LAION_ENCODE_FORMAT": "png"}, "LAION_ENCODE_QUALITY"),  # 95 is no compression level, as in img2dataset
        ({"LAION_ENCODE_QUALITY": "101"}, "LAION_ENCODE_QUALITY"),
        ({"LAION_IMAGE_SIZE": "0"}, "LAION_IMAGE_SIZE"),
        ({"LAION_MIN_IMAGE_SIZE": "-1"}, "LAION_MIN_IMAGE_SIZE"),
        ({"LAION_MAX_ASPECT_RATIO": "0.5"}, "LAION_MAX_ASPECT_RATIO"),
        ({"LAION_MAX_IMAGE_AREA": "-5"}, "LAION_MAX_IMAGE_AREA"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(config.ConfigError) as error:
        config.load(setting, environ)
    assert variable in str(error.value)
    assert "\n" not in str(error.value)


def test_png_with_a_compression_level_is_accepted() -> None:
    loaded = config.load(setting, {"LAION_ENCODE_FORMAT": "png", "LAION_ENCODE_QUALITY": "9"})
    assert process_policy(loaded).encode_quality == 9
