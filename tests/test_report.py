"""report.py on real runs (files and webdataset output): successes, failures, bad rows, a requeue, a later success,
duplicate lines and shards, no Redis."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers import run_script, write_wide
from tools.image_server import ImageServer


def run(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*run_script(name), *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def table(env: dict[str, str], part: str = "r") -> list[dict]:
    return pq.read_table(Path(env["LAION_STATUS_DIR"]) / "s" / f"{part}.parquet").to_pylist()


def test_report_follows_a_run_through_failures_and_a_requeue(redis_server, script_env, tmp_path, image_server):
    paths = [f"/img/r{i}.jpg" for i in range(4)] + ["/status/404", "/status/500", "/status/500"]
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "r.parquet", [image_server.url(p) for p in paths] + ["x"])
    env = {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_STATUS_DIR": str(tmp_path / "status")}
    run("add_task.py", env)
    result = run("report.py", env, "--part", "r")
    assert "unsaved_error_records count=1" in result.stderr  # the bad URL's record, still in Redis
    assert {row["status"] for row in table(env)} == {"pending"}

    run("downloader.py", env, "0", "--until-empty")
    run("save_error_task.py", env, "--until-empty")
    result = run("report.py", env)
    rows = table(env)
    assert [row["row"] for row in rows] == list(range(8))
    assert [row["status"] for row in rows] == ["success"] * 4 + ["404", "500", "500", "bad_url"]
    assert [row["id"] for row in rows] == [f"{i:032x}" for i in range(8)]
    assert all(Path(row["path"]).is_file() for row in rows[:4]) and rows[0]["shard"] is None
    assert rows[4]["error_msg"] and all(row["path"] is None for row in rows[4:])
    assert "s/r.parquet: 8 rows" in result.stdout and "failures: 500 2, 404 1, bad_url 1" in result.stdout

    error_file = next(Path(env["LAION_STORE_ERROR_DIR"]).glob("*.txt"))
    with error_file.open("a", encoding="utf-8") as file:
        file.write(error_file.read_text(encoding="utf-8").splitlines()[0] + "\n")  # a duplicate line
    run("save_error_task.py", env, "--requeue")
    run("report.py", env)
    rows = table(env)
    assert [row["status"] for row in rows] == ["success"] * 4 + ["404", "pending", "pending", "bad_url"]
    assert rows[5]["error_msg"].startswith("requeued after 500")

    first = Path(rows[0]["path"])
    shutil.copy(first, first.with_name(f"{5:032x}.jpg"))  # row 5 was stored by the requeued task
    run("downloader.py", env, "0", "--until-empty")
    run("save_error_task.py", env, "--until-empty")
    redis_server.stop()
    result = run("report.py", env, "--subset", "s", "--part", "r")
    rows = table(env)
    assert [row["status"] for row in rows] == ["success"] * 4 + ["404", "success", "500", "bad_url"]
    assert "redis_not_checked" in result.stderr
    assert "success 5 (62.5%)  failed 3 (37.5%)  pending 0 (0.0%)" in result.stdout


def test_report_finds_samples_in_finished_shards(redis_server, script_env, tmp_path, image_server):
    paths = [f"/img/r{i}.jpg" for i in range(4)] + ["/status/404", "/img/late.jpg", "/status/500"]
    urls = [image_server.url(p) for p in paths] + ["x"]
    urls[5] = image_server.url(paths[5]).replace("127.0.0.1", "127.0.0.2")  # refused until the requeue
    parquet_dir = Path(script_env["LAION_PARQUET_DIR"]) / "s"
    write_wide(parquet_dir / "r.parquet", urls)
    write_wide(parquet_dir / "q.parquet", [image_server.url(f"/img/q{i}.jpg") for i in range(5)])
    env = {
        **script_env,
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_STATUS_DIR": str(tmp_path / "status"),
        "LAION_OUTPUT_FORMAT": "webdataset",
        "LAION_SHARD_SIZE": "3",
        "LAION_THREAD_NUM": "4",
    }
    run("add_task.py", env)
    write_wide(parquet_dir / "p.parquet", [image_server.url("/img/p.jpg")] * 2)  # never queued: its rows are unseen
    run("downloader.py", env, "0", "--until-empty")
    run("save_error_task.py", env, "--until-empty")
    result = run("report.py", env)
    rows = table(env)
    assert [row["status"] for row in rows] == ["success"] * 4 + ["404", "connection", "500", "bad_url"]
    assert [(row["status"], row["shard"]) for row in table(env, "p")] == [("pending", None)] * 2
    for row in rows[:4] + table(env, "q"):
        assert row["path"] is None and row["shard"].startswith(f"{env['LAION_STORE_DIR']}/s/")
        with tarfile.open(row["shard"]) as tar:
            assert f"{row['member']}.jpg" in tar.getnames()
    assert [row["member"] for row in rows[:4]] == [f"r-{i:09d}" for i in range(4)]
    assert all(row["shard"] is None and row["member"] is None for row in rows[4:])
    assert "s/q.parquet: 5 rows" in result.stdout and "success 5 (100.0%)" in result.stdout

    run("save_error_task.py", env, "--requeue")
    run("report.py", env, "--part", "r")
    assert [row["status"] for row in table(env)] == ["success"] * 4 + ["404", "pending", "pending", "bad_url"]
    late = ImageServer("127.0.0.2", image_server.port)
    late.start()
    try:
        run("downloader.py", env, "0", "--until-empty")
    finally:
        late.stop()
    run("save_error_task.py", env, "--until-empty")

    store = Path(env["LAION_STORE_DIR"]) / "s"
    shard = Path(table(env)[0]["shard"])
    shutil.copy(shard.with_suffix(".parquet"), store / "orphan.parquet")  # an index without its tar: not finished
    temp = Path(env["LAION_STORE_DIR"]) / ".tmp" / "testhost-9"  # a worker's unfinished shard
    temp.mkdir(parents=True)
    shutil.copy(shard, temp / "a.tar")
    shutil.copy(shard.with_suffix(".parquet"), temp / "a.parquet")
    copied = pq.read_table(shard.with_suffix(".parquet"))["part"].to_pylist().count("r")
    shutil.copy(shard, store / "zz-copy.tar")  # a second copy of a finished shard: its rows are stored twice
    shutil.copy(shard.with_suffix(".parquet"), store / "zz-copy.parquet")
    redis_server.stop()
    result = run("report.py", env, "--subset", "s")
    rows = table(env)
    assert [row["status"] for row in rows] == ["success"] * 4 + ["404", "success", "500", "bad_url"]
    assert rows[5]["member"] == f"r-{5:09d}" and Path(rows[5]["shard"]).is_file()
    assert rows[0]["shard"] == str(shard)  # the first shard in name order wins
    assert f"duplicates: {copied} (rows stored more than once, each reported once)" in result.stdout
    assert "success 5 (62.5%)  failed 3 (37.5%)  pending 0 (0.0%)" in result.stdout
