"""A disk that fills up mid-build: one clear error naming the path and what was written, exit 2,
no temporary cache entry left behind."""

import errno
import os
import shutil
import subprocess
import sys

import pytest

from edgebuild.cache import Cache
from edgebuild.errors import EdgebuildError
from tests.conftest import ROOT


def test_a_full_disk_while_writing_an_entry_names_the_path_and_leaves_nothing(tmp_path):
    cache = Cache(tmp_path / "cache")

    def produce(folder):
        (folder / "model.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.bin"))

    with pytest.raises(EdgebuildError, match=r"writing stage 'export' to .*model.bin \(No space left"):
        cache.put("ab" * 32, produce, "stage 'export'")
    assert not list((tmp_path / "cache").rglob("*model.bin")) and not list((tmp_path / "cache").rglob(".tmp-*"))
    with pytest.raises(ValueError):  # any other failure passes through unchanged
        cache.put("cd" * 32, lambda folder: (_ for _ in ()).throw(ValueError("boom")))


def test_an_unwritable_cache_folder_is_refused_before_any_work(tmp_path):
    with pytest.raises(EdgebuildError, match=r"cache folder /proc/edgebuild-cache cannot be written"):
        Cache(tmp_path.parent / "/proc/edgebuild-cache").check_writable()


def _tmpfs_works(where):
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                       capture_output=True)
    return r.returncode == 0


def test_a_build_on_a_small_disk_exits_2_without_traceback(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _tmpfs_works(disk):
        pytest.skip("needs unshare -rm to mount a small tmpfs (user namespaces)")
    args = [f"cache.dir={disk}/cache", f"hydra.run.dir={tmp_path}/run", "tracking=none", "eval=fast",
            "data=synthetic", "model.kwargs.width=8", "stages.train.epochs=1"]
    cmd = f"mount -t tmpfs -o size=200k tmpfs {disk} && {sys.executable} -m edgebuild {' '.join(args)}; " \
          f"echo rc=$?; find {disk} -name '.tmp-*'"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "the disk filled up while writing stage" in r.stderr
    assert ".tmp-" not in r.stdout
