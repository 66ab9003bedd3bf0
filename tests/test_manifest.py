"""Readers without glue: report.py --manifest writes each subset's shard list and sizes.json, and a run's shards read
back from them with the webdataset library and with Hugging Face datasets, images of several formats included."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset

from laion5b import manifest
from laion5b.imageformat import image_extension
from tests.helpers import run_script, webdataset_env
from tests.test_webdataset import assert_exact_books, queue
from tools.image_server import image_bytes

FORMATS = ("jpg", "png", "webp", "gif")
"""Served in turn, so that every shard (and the first samples, from which datasets infers its features) mixes them."""
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return webdataset_env(script_env, LAION_SHARD_SIZE="6")


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """Hugging Face datasets, imported here (it takes a second) offline, its caches in a temporary folder: it reads
    those variables when imported."""
    variables = {**OFFLINE, "HF_HOME": str(tmp_path_factory.mktemp("hf"))}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        datasets = importlib.import_module("datasets")
        assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE, "it must not reach the network"
        yield datasets
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def download(env: dict[str, str], client, server, rows: int) -> list:
    """Queue ``rows`` images of the formats in turn and run a worker until the queue is empty."""
    tasks = queue(client, [server.url(f"/img/m{row}.{FORMATS[row % len(FORMATS)]}") for row in range(rows)])
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return tasks


def report_manifest(env: dict[str, str], *args: str) -> list[str]:
    """Run ``report.py --manifest *args``; the lines it prints."""
    result = subprocess.run([*run_script("report.py"), "--manifest", *args], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def load_with_datasets(datasets: ModuleType, paths: list[str], cache: Path):
    """The shards as Hugging Face datasets' webdataset loader reads them."""
    return datasets.load_dataset("webdataset", data_files={"train": paths}, split="train", cache_dir=str(cache))


def test_a_runs_shards_read_back_with_webdataset_and_datasets_from_the_manifest(
    env, redis_server, image_server, hf_datasets, tmp_path: Path
) -> None:
    """By default every sample has one image member, .jpg: jpgs keep their bytes, the others are re-encoded (their
    format in original_format); report.py --manifest lists the shards in forms that both readers take."""
    client = redis_server.client()
    tasks = download(env, client, image_server, 16)
    stored = assert_exact_books(client, tmp_path / "images", tasks)
    assert len(stored) == 16 and {extension for files in stored.values() for extension in files} == {
        "jpg", "txt", "json"}  # fmt: skip
    folder = tmp_path / "images" / "sub"
    summary, pattern = report_manifest(env)
    names = (folder / manifest.SHARDS_FILE).read_text().split()
    sizes = json.loads((folder / manifest.SIZES_FILE).read_text())
    assert names == sorted(path.name for path in folder.glob("*.tar")) == list(sizes) and len(names) == 3
    assert (
        sum(sizes.values()) == 16 and summary == f"sub: 3 shards, 16 samples; wrote {folder}/shards.txt and sizes.json"
    )
    paths = [str(folder / name) for name in names]
    assert list(braceexpand.braceexpand(pattern)) == paths

    samples = list(webdataset.WebDataset(pattern, shardshuffle=False))
    assert len(samples) == 16
    for sample in samples:
        metadata = json.loads(sample["json"])
        row = int(metadata["id"][2:])
        served = image_bytes(f"m{row}", FORMATS[row % len(FORMATS)])
        assert metadata["original_format"] == image_extension(served) and image_extension(sample["jpg"]) == "jpg"
        assert metadata["original_sha256"] == hashlib.sha256(served).hexdigest()
        assert (sample["jpg"] == served) is (metadata["original_format"] == "jpg")

    dataset = load_with_datasets(hf_datasets, paths, tmp_path / "hf")
    assert dataset.num_rows == 16 and set(dataset.column_names) >= {"jpg", "txt", "json", "__key__"}
    formats = Counter()
    for sample in dataset:
        task = tasks[int(sample["json"]["id"][2:])]
        assert (sample["txt"], sample["json"]["url"]) == (task.text, task.url)
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])
        formats[sample["json"]["original_format"]] += 1
    assert formats == {"jpg": 4, "png": 4, "webp": 4, "gif": 4}


def test_keep_format_keeps_each_images_bytes_which_datasets_refuses(
    env, redis_server, image_server, hf_datasets, tmp_path: Path
) -> None:
    """webdataset_keep_format = true: each image as downloaded, under its own extension; the webdataset library reads
    them, Hugging Face datasets refuses shards whose samples do not share their members' names."""
    client = redis_server.client()
    tasks = download({**env, "LAION_WEBDATASET_KEEP_FORMAT": "true"}, client, image_server, 8)
    assert len(assert_exact_books(client, tmp_path / "images", tasks)) == 8
    paths = report_manifest(env, "list")[1].split("::")  # open_clip's list
    assert paths == [str(path) for path in sorted((tmp_path / "images" / "sub").glob("*.tar"))]
    samples = list(webdataset.WebDataset(paths, shardshuffle=False))
    kept = Counter(extension for sample in samples for extension in FORMATS if extension in sample)
    assert kept == dict.fromkeys(FORMATS, 2)
    for sample in samples:
        extension = json.loads(sample["json"])["ext"]
        assert sample[extension] == image_bytes(f"m{int(json.loads(sample['json'])['id'][2:])}", extension)
    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        load_with_datasets(hf_datasets, paths, tmp_path / "hf")


@pytest.mark.parametrize(
    "names",
    [
        ["h-w-000000-3f9c01ab"],
        ["h-w-000000-3f9c01ab", "h-w-000001-3f9c01ab", "h-w-000002-3f9c01ab"],
        ["h-w-000000-3f9c01ab", "h-w-000002-3f9c01ab", "h-w-000003-3f9c01ab", "h-w-000004-0badcafe"],
        ["h-w-000000-aa", "h-v-000000-aa", "g-w-000001-aa", "h-w-999999-aa", "h-w-1000000-aa", "h-w-1000001-aa"],
        ["odd,name", "h-w-000007-aa", "x{y}"],
    ],
)
def test_the_brace_pattern_expands_to_the_shards(tmp_path: Path, names: list[str]) -> None:
    found = manifest.Manifest(f"{tmp_path}/a,{{b}}", {f"{name}.tar": 1 for name in sorted(names)})
    assert sorted(braceexpand.braceexpand(manifest.braces(found))) == sorted(found.paths())
    assert manifest.joined(found).split("::") == found.paths()


def test_consecutive_shards_of_one_process_make_one_range() -> None:
    names = [f"dl-01-7-{seq:06d}-{incarnation}.tar" for incarnation in ("3f9c01ab", "12345678") for seq in range(3)]
    pattern = manifest.braces(manifest.Manifest("/s", dict.fromkeys(names, 1)))
    assert pattern == "/s/{dl-01-7-{000000..000002}-3f9c01ab,dl-01-7-{000000..000002}-12345678}.tar"


def test_only_finished_shards_with_a_readable_index_are_listed(tmp_path: Path) -> None:
    for name, rows in (("a", 3), ("b", 5), ("c", 1)):
        (tmp_path / f"{name}.tar").write_bytes(b"")
        pq.write_table(pa.table({"key": [str(row) for row in range(rows)]}), tmp_path / f"{name}.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet")  # unreadable: left out
    (tmp_path / "d.tar").write_bytes(b"")  # no index: not finished
    pq.write_table(pa.table({"key": ["x"]}), tmp_path / "e.parquet")  # no tar
    found = manifest.survey(str(tmp_path))
    assert found.sizes == {"a.tar": 3, "b.tar": 5} and found.samples == 8
    manifest.write(found)
    assert (tmp_path / "shards.txt").read_text() == "a.tar\nb.tar\n"
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"a.tar": 3, "b.tar": 5}
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary file left
