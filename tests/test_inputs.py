"""Any URL list through add_task.py (and a real worker): CSV, TSV, JSON lines, txt.gz, DataComp with hash checks."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion5b.inputs import find_files
from laion5b.tasks import decode
from tests.helpers import kill_add_task_midway, run_script
from tools.image_server import image_bytes


def run_add_task(env: dict[str, str], **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        run_script("add_task.py"), env={**env, **overrides}, capture_output=True, text=True, timeout=120
    )


def outcomes(client) -> tuple[dict[int, object], dict[int, dict]]:
    """Queued tasks and error records, each by row."""
    tasks = {task.row: task for task in map(decode, client.lrange("laion5b_task", 0, -1))}
    errors = {record["row"]: record for record in map(json.loads, client.lrange("laion5b_task_error", 0, -1))}
    assert not tasks.keys() & errors.keys()
    return tasks, errors


def test_auto_reads_every_format_but_txt(tmp_path):
    for name in ("a.parquet", "b.csv", "c.tsv.gz", "d.jsonl", "e.jsonl.gz", "README.txt", "f.txt.gz", ".g.csv"):
        (tmp_path / name).write_bytes(b"")
    assert [(f.part, f.format) for f in find_files(tmp_path)] == [
        ("a", "parquet"), ("b", "csv"), ("c", "tsv"), ("d", "jsonl"), ("e", "jsonl"),
    ]  # fmt: skip
    assert [f.key for f in find_files(tmp_path, "txt")] == ["README.txt", "f.txt.gz"]


def test_csv_with_malformed_rows(redis_server, script_env):
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    (folder / "list.csv").write_text(
        'url,caption,w,uid\nhttp://x/0.jpg,"a, ""quoted"" caption",640,u0\n\nhttp://x/1.jpg,short row\n'
        'ftp://x/2,bad url,1,u2\nhttp://x/3.jpg,"two\nlines",7,u3\n,no url,1,u4\n',
        encoding="utf-8",
    )
    result = run_add_task(script_env, LAION_ID_COL="uid", LAION_SAVE_COLUMNS="w")
    assert result.returncode == 0, result.stderr
    client = redis_server.client()
    tasks, errors = outcomes(client)
    assert {row: (t.id, t.url, t.text, t.meta) for row, t in tasks.items()} == {
        0: ("u0", "http://x/0.jpg", 'a, "quoted" caption', {"w": "640"}),
        3: ("u3", "http://x/3.jpg", "two\nlines", {"w": "7"}),
    }
    assert {row: (e["status"], e["error_msg"]) for row, e in errors.items()} == {
        1: ("bad_row", "row has 2 fields, expected 4"),
        2: ("bad_url", "URL scheme 'ftp' is not http or https"),
        4: ("bad_url", "missing or empty URL"),
    }
    assert errors[2]["meta"] == {"w": "1"} and errors[2]["id"] == "u2"
    assert client.get("laion5b_tongji_all") == "5" and client.get("laion5b_tongji_error") == "3"


def test_cc3m_headerless_tsv(redis_server, script_env):
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    lines = ['a "quoted caption\thttp://x/0.jpg', "only one field", "caption\thttp://x/2.jpg", "x\ty\tz"]
    with gzip.open(folder / "Train_GCC-training.tsv.gz", "wt", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    result = run_add_task(script_env, LAION_INPUT_COLUMNS="caption,url")
    assert result.returncode == 0, result.stderr
    tasks, errors = outcomes(redis_server.client())
    assert {row: (t.id, t.text, t.part) for row, t in tasks.items()} == {
        0: ("0", 'a "quoted caption', "Train_GCC-training"),
        2: ("2", "caption", "Train_GCC-training"),
    }
    assert {row: e["status"] for row, e in errors.items()} == {1: "bad_row", 3: "bad_row"}


def test_json_lines_with_malformed_lines(redis_server, script_env):
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    lines = [
        {"URL": "http://x/0.jpg", "caption": "zero", "score": 0.5, "tags": ["a"]},
        "{not json",
        [1, 2],
        {"caption": "no url"},
        {"URL": "http://x/4.jpg", "caption": None, "score": 1},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "l.jsonl").write_text(text + "\n\n", encoding="utf-8")
    result = run_add_task(script_env, LAION_SAVE_COLUMNS="score,tags")
    assert result.returncode == 0, result.stderr
    tasks, errors = outcomes(redis_server.client())
    assert {row: (t.url, t.text, t.meta) for row, t in tasks.items()} == {
        0: ("http://x/0.jpg", "zero", {"score": 0.5, "tags": ["a"]}),
        4: ("http://x/4.jpg", None, {"score": 1, "tags": None}),
    }
    assert {row: e["status"] for row, e in errors.items()} == {1: "bad_row", 2: "bad_row", 3: "bad_url"}
    assert errors[1]["error_msg"].startswith("line is not JSON")
    assert errors[2]["error_msg"] == "line is not a JSON object"


def test_a_plain_url_list_is_read_only_when_asked(redis_server, script_env):
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    with gzip.open(folder / "urls.txt.gz", "wt", encoding="utf-8") as file:
        file.write("http://x/0.jpg\n\n  http://x/1.jpg  \nnot a url\n")
    assert run_add_task(script_env).returncode == 0
    assert redis_server.client().llen("laion5b_task") == 0
    assert run_add_task(script_env, LAION_INPUT_FORMAT="txt").returncode == 0
    tasks, errors = outcomes(redis_server.client())
    assert {row: t.url for row, t in tasks.items()} == {0: "http://x/0.jpg", 1: "http://x/1.jpg"}
    assert {row: e["status"] for row, e in errors.items()} == {2: "bad_url"}


def test_a_column_the_file_lacks_skips_the_file_with_one_line_and_exit_1(redis_server, script_env):
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    (folder / "a.csv").write_text("URL,text\nhttp://x/0.jpg,a\n", encoding="utf-8")
    (folder / "b.csv").write_text("url,text,score\nhttp://x/0.jpg,b,3\n", encoding="utf-8")
    result = run_add_task(script_env, LAION_SAVE_COLUMNS="score")
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if "file_failed" in line]
    assert len(failed) == 1
    assert failed[0].endswith("a.csv: save_columns 'score' is not a column of this file (columns: URL, text)")
    tasks, _ = outcomes(redis_server.client())
    assert [t.part for t in tasks.values()] == ["b"]


def test_kill_9_mid_csv_resumes_exactly_once(redis_server, script_env):
    rows = 150_000
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    with gzip.open(folder / "big.csv.gz", "wt", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["url", "caption"])
        for i in range(rows):
            writer.writerow([f"http://h/{i}.jpg", f"caption, {i}\nsecond line" if i % 7 == 0 else f"c{i}"])
            if i % 1000 == 0:
                file.write("\n")  # blank lines are no rows
    env = {**script_env, "LAION_ADDTASK_BATCH": "1000"}
    client = redis_server.client()
    kill_add_task_midway(env, client, rows, "big.csv.gz")
    assert run_add_task(env).returncode == 0
    tasks = [decode(raw) for raw in client.lrange("laion5b_task", 0, -1)]
    counts = Counter(t.row for t in tasks)
    assert len(counts) == rows and set(counts.values()) == {1}
    assert all(t.url == f"http://h/{t.row}.jpg" for t in tasks)
    assert int(client.get("laion5b_tongji_all")) == rows


@pytest.mark.parametrize("engine", ["threads", "async"])
def test_datacomp_with_sha256_checks_end_to_end(redis_server, script_env, image_server, engine):
    names = [f"d{i}" for i in range(6)]
    hashes = [hashlib.sha256(image_bytes(name)).hexdigest() for name in names]
    hashes[1] = "0" * 64  # wrong
    hashes[4] = hashes[3]  # the hash of another image
    hashes[5] = ""  # not checked
    table = {
        "uid": [f"uid{i:02d}" for i in range(6)] + ["uid06"],
        "url": [image_server.url(f"/img/{name}.jpg") for name in names] + [image_server.url("/img/d6.jpg")],
        "text": [f"caption {i}" for i in range(7)],
        "original_width": list(range(100, 107)),
        "original_height": list(range(200, 207)),
        "sha256": [*hashes, "not-a-hash"],
        "clip_score": [0.25 + i for i in range(7)],
        "license": [f"cc-{i}" for i in range(7)],
    }
    folder = Path(script_env["LAION_PARQUET_DIR"])
    folder.mkdir()
    pq.write_table(pa.table(table), folder / "00000000.parquet")
    env = {
        **script_env,
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_ENGINE": engine,
        "LAION_ID_COL": "uid",
        "LAION_HASH_COL": "sha256",
        "LAION_VERIFY_HASH": "sha256",
        "LAION_SAVE_COLUMNS": "clip_score,license",
    }
    assert run_add_task(env).returncode == 0
    downloader = [*run_script("downloader.py"), "0", "--until-empty"]
    assert subprocess.run(downloader, env=env, capture_output=True, timeout=120).returncode == 0
    client = redis_server.client()
    errors = {record["id"]: record for record in map(json.loads, client.lrange("laion5b_task_error", 0, -1))}
    assert {uid: record["status"] for uid, record in errors.items()} == {
        "uid01": "hash_mismatch",
        "uid04": "hash_mismatch",
        "uid06": "bad_row",
    }
    assert errors["uid04"]["meta"] == {"clip_score": 4.25, "license": "cc-4"}
    assert errors["uid04"]["text"] == "caption 4" and errors["uid04"]["attempts"] == 1
    assert "not 64 hex digits" in errors["uid06"]["error_msg"]
    stored = sorted(path.name for path in Path(env["LAION_STORE_DIR"]).rglob("*.jpg"))
    assert stored == ["uid00.jpg", "uid02.jpg", "uid03.jpg", "uid05.jpg"]
    assert client.get("laion5b_tongji_succ") == "4" and client.get("laion5b_tongji_error") == "3"
