from pathlib import Path

import pytest

from laion5b import inputs
from laion5b.inputs import Columns, SourceFile, Spec, find_files
from laion5b.parquet import ParquetError, count_rows
from laion5b.rows import InputError
from tests.helpers import SAMPLE, write_original, write_wide


def read_rows(path: Path, start: int, batch_size: int, columns: Columns | None = None):
    source = SourceFile(Path(path), "k", "s", "p")
    spec = Spec(columns=columns or Columns())
    return inputs.read_rows(source, spec, inputs.columns_of(source, spec), start, batch_size)


def test_subset_and_part_names(tmp_path):
    write_wide(
        tmp_path / "laion2B-en" / "part-00007-0b5d2e2a-1c9f-4d8e-9b1a-2f7c3e4d5a6b-c000.snappy.parquet", ["http://a"]
    )
    write_wide(tmp_path / "laion2B-en" / "sub" / "extra.parquet", ["http://a"])
    write_wide(tmp_path / "top.snappy.parquet", ["http://a"])
    (tmp_path / "laion2B-en" / "_SUCCESS").write_text("")
    (tmp_path / "laion2B-en" / ".part-00007.crc").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    names = {(f.key, f.subset, f.part) for f in find_files(tmp_path)}
    assert names == {
        (
            "laion2B-en/part-00007-0b5d2e2a-1c9f-4d8e-9b1a-2f7c3e4d5a6b-c000.snappy.parquet",
            "laion2B-en",
            "00007",
        ),
        ("laion2B-en/sub/extra.parquet", "laion2B-en/sub", "extra"),
        ("top.snappy.parquet", "default", "top"),
    }


def test_clashing_part_names_use_full_stems(tmp_path):
    write_wide(tmp_path / "s" / "part-00001-aaaaaaaa-1111.snappy.parquet", ["http://a"])
    write_wide(tmp_path / "s" / "part-00001-bbbbbbbb-2222.snappy.parquet", ["http://a"])
    parts = sorted(f.part for f in find_files(tmp_path))
    assert parts == ["part-00001-aaaaaaaa-1111.snappy", "part-00001-bbbbbbbb-2222.snappy"]


def test_original_schema_rows(tmp_path):
    path = write_original(tmp_path / "a.parquet", ["http://x/0", None, "http://x/2"], sample_ids=[5.0, 6.0, None])
    rows = [row for batch in read_rows(path, 0, 2) for row in batch]
    assert [(r.row, r.sample_id, r.url, r.text) for r in rows] == [
        (0, 5.0, "http://x/0", "caption 0"),
        (1, 6.0, None, "caption 1"),
        (2, None, "http://x/2", "caption 2"),
    ]


def test_wide_schema_uses_hash_and_ignores_case(tmp_path):
    path = write_wide(tmp_path / "w.parquet", ["http://x/0", "http://x/1"], hashes=["h0", "h1"])
    rows = [row for batch in read_rows(path, 0, 10) for row in batch]
    assert [(r.sample_id, r.url, r.text) for r in rows] == [
        ("h0", "http://x/0", "wide caption 0"),
        ("h1", "http://x/1", "wide caption 1"),
    ]


def test_reads_from_a_position_across_row_groups(tmp_path):
    urls = [f"http://x/{i}" for i in range(95)]
    path = write_original(tmp_path / "g.parquet", urls, row_group_size=10)
    rows = [row for batch in read_rows(path, 37, 8) for row in batch]
    assert [r.row for r in rows] == list(range(37, 95))
    assert all(len(batch) <= 8 for batch in read_rows(path, 37, 8))
    assert list(read_rows(path, 95, 8)) == []


def test_real_sample_has_messy_rows():
    rows = [row for batch in read_rows(SAMPLE, 0, 4096) for row in batch]
    assert count_rows(SAMPLE) == len(rows) == 10_000
    assert [r.row for r in rows] == list(range(10_000))
    assert all(r.sample_id is None for r in rows)
    assert sum(1 for r in rows if r.url == "UNLIKELY") == 1
    assert any(" " in r.url for r in rows if isinstance(r.url, str))
    assert sum(1 for r in rows if r.text and not r.text.isascii()) == 597


@pytest.mark.parametrize("content", [b"", b"not parquet at all", b"PAR1" + b"\0" * 20])
def test_unreadable_files_raise_one_line(tmp_path, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(ParquetError) as error:
        count_rows(path)
    assert "\n" not in str(error.value)


def test_missing_url_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nourl.parquet"
    pq.write_table(pa.table({"TEXT": ["a"]}), path)
    with pytest.raises(InputError, match="no URL column"):
        list(read_rows(path, 0, 10))


def test_truncated_file(tmp_path):
    good = write_original(tmp_path / "t.parquet", [f"http://x/{i}" for i in range(1000)])
    data = Path(good).read_bytes()
    Path(good).write_bytes(data[: len(data) // 2])
    with pytest.raises(ParquetError):
        list(read_rows(good, 0, 100))


def test_named_columns_and_save_columns_with_json_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "datacomp.parquet"
    table = {"uid": ["u0", "u1"], "Link": ["http://x/0", "http://x/1"], "alt": ["a", None]}
    table |= {"original_width": [640, None], "score": [0.5, float("nan")], "raw": [b"\xff", b"ok"]}
    pq.write_table(pa.table(table), path)
    columns = Columns(url="link", id="uid", caption="alt", hash="", save=("original_width", "score", "raw"))
    rows = [row for batch in read_rows(path, 0, 10, columns) for row in batch]
    assert [(r.sample_id, r.url, r.text, r.meta) for r in rows] == [
        ("u0", "http://x/0", "a", {"original_width": 640, "score": 0.5, "raw": "base64:/w=="}),
        ("u1", "http://x/1", None, {"original_width": None, "score": None, "raw": "ok"}),
    ]


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        (Columns(url="link"), "url_col 'link'"),
        (Columns(save=("nope",)), "save_columns 'nope'"),
        (Columns(hash="sha256"), "hash_col 'sha256'"),
    ],
)
def test_a_column_the_file_lacks_names_the_setting_and_the_columns(tmp_path, columns, named):
    path = write_wide(tmp_path / "w.parquet", ["http://x/0"])
    with pytest.raises(InputError) as error:
        read_rows(path, 0, 10, columns)
    assert named in str(error.value) and "columns: url, hash, image_suffix, caption" in str(error.value)
