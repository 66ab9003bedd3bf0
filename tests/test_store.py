import os
import subprocess
import sys
from pathlib import Path

from laion5b.store import Store, image_folder, remove_dead_temp_folders, temp_root
from laion5b.tasks import Task


def task(row: int = 12_345, id_: str = "abc") -> Task:
    return Task(id=id_, url="http://x", subset="laion2B-en", part="00007", row=row)


def test_layout_is_deterministic_and_sharded(tmp_path):
    assert image_folder("/data", task(12_345)) == "/data/laion2B-en/00007/00001"
    assert image_folder("/data", task(9_999)) == "/data/laion2B-en/00007/00000"
    assert image_folder("/data", task(18_000_000)) == "/data/laion2B-en/00007/01800"


def test_save_is_atomic_and_found_again(tmp_path):
    store = Store(tmp_path, "host", "0", fsync=True)
    store.open()
    assert store.existing(task()) is None
    path = store.save(task(), b"\xff\xd8\xff data", "jpg")
    assert path == tmp_path / "laion2B-en" / "00007" / "00001" / "abc.jpg"
    assert path.read_bytes() == b"\xff\xd8\xff data"
    assert list(store.temp_dir.iterdir()) == []
    assert Store(tmp_path, "host", "1", fsync=False).existing(task()) == path
    store.close()
    assert not store.temp_dir.exists()


def test_temp_folders_of_dead_workers_are_removed(tmp_path):
    root = temp_root(tmp_path, "host")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:
        if Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] == "Z":
            break
    for folder in (f"0.{dead.pid}", f"1.{zombie.pid}", f"2.{os.getpid()}"):
        (root / folder).mkdir(parents=True)
        (root / folder / "partial.jpg").write_bytes(b"half")
    remove_dead_temp_folders(root)
    assert sorted(p.name for p in root.iterdir()) == [f"2.{os.getpid()}"]
    zombie.wait()


def test_opening_clears_this_workers_own_leftovers(tmp_path):
    store = Store(tmp_path, "host", "0", fsync=False)
    store.temp_dir.mkdir(parents=True)
    (store.temp_dir / "left.jpg").write_bytes(b"x")
    store.open()
    assert list(store.temp_dir.iterdir()) == []
