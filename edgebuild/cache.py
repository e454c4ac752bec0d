"""Content-addressed stage cache: outputs/cache/<key[:2]>/<key>/ holding files and result.json.

Entries are built in a temporary folder and renamed into place, so an interrupted build or two
parallel sweep jobs never leave (or read) half an entry; a damaged entry is detected and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RECORD = "result.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20


def out_of_space(error: BaseException, where: Path) -> bool:
    """Whether `error` means the disk under `where` is full. torch's and OpenVINO's writers raise a
    RuntimeError without an errno, so for those the free space decides (call this before cleaning up)."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    if isinstance(error, RuntimeError):
        try:
            return shutil.disk_usage(where).free < NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


def disk_full_error(path: Any, what: str, error: BaseException) -> Any:
    from edgebuild.errors import EdgebuildError

    reason = error.strerror if isinstance(error, OSError) and error.strerror else error
    return EdgebuildError(f"the disk filled up while writing {what} to {path} ({reason})",
                          "free space on that disk, or move the cache to a bigger one with cache.dir=/path "
                          "(finished stages stay cached; the build resumes from them)")


def cache_key(description: dict[str, Any]) -> str:
    """sha256 of the canonical (sorted-key) JSON of everything that determines an output."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Entry:
    key: str
    path: Path
    record: dict[str, Any]
    hit: bool


class Cache:
    def __init__(self, root: Path, enabled: bool = True, scratch: Path | None = None):
        self.root = Path(root)
        self.enabled = enabled
        # with the cache off, outputs still need a home: a scratch folder of this build
        self.scratch = Path(scratch) if scratch else self.root / "_scratch"

    def _path(self, key: str) -> Path:
        return (self.root / key[:2] / key) if self.enabled else (self.scratch / key)

    def get(self, key: str, verify: Callable[[Path, dict[str, Any]], bool] | None = None) -> Entry | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            record = json.loads((path / RECORD).read_text())
        except (OSError, ValueError):
            if path.exists():
                log.warning("cache entry %s is incomplete; rebuilding it", path)
                shutil.rmtree(path, ignore_errors=True)
            return None
        if verify is not None and not verify(path, record):
            log.warning("cache entry %s is damaged (files changed or missing); rebuilding it", path)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Entry(key, path, record, hit=True)

    def check_writable(self) -> None:
        """Plan time: the cache folder can be created and written, before any work."""
        from edgebuild.errors import EdgebuildError

        folder = self.root if self.enabled else self.scratch
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(folder, "a probe file", e) from None
            raise EdgebuildError(f"the cache folder {folder} cannot be written ({e.strerror or e})",
                                 "set cache.dir to a folder you can write, e.g. cache.dir=outputs/cache") from None

    def put(self, key: str, produce: Callable[[Path], dict[str, Any]], what: str = "a cache entry") -> Entry:
        """Run `produce(tmp_folder) -> record` and publish the folder atomically under `key`."""
        final = self._path(key)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(tmp, what, e) from None
            raise
        try:
            record = produce(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            if final.exists() and not self.enabled:
                shutil.rmtree(final)
            try:
                os.rename(tmp, final)
            except OSError:  # another process published the same key first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
                record = json.loads((final / RECORD).read_text())
        except BaseException as e:
            full = out_of_space(e, tmp.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise disk_full_error(getattr(e, "filename", None) or tmp, what, e) from None
            raise
        return Entry(key, final, record, hit=False)
