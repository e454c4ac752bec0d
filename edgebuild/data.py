"""Data: named sources of labelled images, split by seed, decoded once, normalized on the fly.

A source returns uint8 images [N,C,H,W] at the configured size plus integer labels; the DataModule
splits, normalizes (mean/std, which become part of every artifact's metadata) and serves batches
to training, calibration and evaluation. Tasks with other target formats (detection) register their
own sources and DataModule subclass through `SOURCES` and `Task.datamodule`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass
class Labelled:
    images: np.ndarray  # uint8 [N,C,H,W]
    labels: np.ndarray  # int64 [N]


@dataclass
class Source:
    """What a data source yields: either one pool to split by seed, or ready-made splits."""

    class_names: list[str]
    signature: str  # identifies the raw data (enters the data fingerprint)
    pool: Labelled | None = None
    splits: dict[str, Labelled] | None = None
    load: Callable[[], Source] | None = None  # decode later: a fully cached build never needs the pixels
    # where the data came from, for the summary: {split: text} for ready-made splits, and the pool's text
    origins: dict[str, str] | None = None
    pool_origin: str | None = None
    pool_name: str | None = None  # short name in "split from NAME by seed S" (default: the pool's text)
    sizes: dict[str, int] | None = None  # images per ready-made split and "pool", when known before decoding


# typed keys of data.options (every other key is a loader-specific extra); `strict` does not enter the fingerprint
DATA_OPTIONS: dict[str, tuple[type, Any]] = {"strict": (bool, False), "keep_difficult": (bool, False)}
UNFINGERPRINTED_OPTIONS = ("strict",)  # they decide whether a build may go on, not what data it sees


def data_option(cfg: Any, key: str) -> Any:
    """A typed data.options key, its default when unset; a value of the wrong type is an input error."""
    kind, default = DATA_OPTIONS[key]
    value = (cfg.options or {}).get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise EdgebuildError(f"data.options.{key}={value!r} must be a {kind.__name__}",
                             f"set data.options.{key}=true or false (default {str(default).lower()})")
    return value


def _resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 [N,C,H,W] -> uint8 [N,channels,size,size] (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images)
    if t.shape[1] != channels:
        if t.shape[1] == 1:
            t = t.expand(-1, channels, -1, -1)
        elif channels == 1:
            t = (t.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise EdgebuildError(f"cannot convert {t.shape[1]}-channel images to {channels} channels")
    if t.shape[-1] != size or t.shape[-2] != size:
        out = []
        for chunk in t.split(4096):
            out.append(F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False).round().clamp(0, 255))
        t = torch.cat(out)
    return t.to(torch.uint8).contiguous().numpy()


# ---------------------------------------------------------------------------------------- sources
def digits_source(cfg: Any, cache_dir: Path) -> Source:
    from importlib.metadata import version

    def load() -> Source:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
        return Source(names, signature, pool=Labelled(images, d.target.astype(np.int64)))

    names, signature = [str(c) for c in range(10)], f"sklearn-digits-{version('scikit-learn')}"
    return Source(names, signature, load=load)


def synthetic_source(cfg: Any, cache_dir: Path) -> Source:
    """Learnable generated images: one smooth random template per class plus noise (seeded)."""
    rng = np.random.default_rng(cfg.split.seed + 1234)
    n, k, c, s = cfg.num_samples, cfg.num_classes, cfg.channels, cfg.image_size
    templates = rng.uniform(0, 255, size=(k, c, 4, 4))
    templates = np.kron(templates, np.ones((1, 1, (s + 3) // 4, (s + 3) // 4)))[:, :, :s, :s]
    labels = np.arange(n) % k
    rng.shuffle(labels)
    images = templates[labels] * 0.7 + rng.normal(0, 30, size=(n, c, s, s)) + 38
    return Source(class_names=[f"class{i}" for i in range(k)],
                  signature=f"synthetic-{n}-{k}-{c}-{s}-{cfg.split.seed}",
                  pool=Labelled(images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)))


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EdgebuildError(f"cannot read image {where}: {e}",
                             "remove or replace the corrupt file (every image in the folder is used)") from None


def _folder_entries(root: Path, cache_dir: Path | None = None) -> tuple[list[tuple[str, str, Callable[[], bytes]]],
                                                                       str]:
    """(relative path, display path, reader) for every file under a folder or inside a .tar(.gz). A tarball's
    member list is kept in `cache_dir` by its size and mtime: listing a .tar.gz decompresses all of it (2 s
    for CIFAR-10), and a cached rebuild needs only the names."""
    if root.is_file() and tarfile.is_tarfile(root):
        st = root.stat()
        signature = f"tar:{root.resolve()}:{st.st_size}:{int(st.st_mtime)}"
        digest = hashlib.sha256(signature.encode()).hexdigest()
        listing = cache_dir / "listings" / f"{digest}.json" if cache_dir else None
        try:
            names = json.loads(listing.read_text()) if listing else None
        except (OSError, ValueError):
            names = None
        opened: dict[str, Any] = {}

        def members() -> dict[str, tarfile.TarInfo]:
            if not opened:  # opened once, on the first read (never on a cached rebuild)
                opened["tar"] = tarfile.open(root)
                opened["members"] = {m.name: m for m in opened["tar"].getmembers() if m.isfile()}
            return opened["members"]

        def reader(name: str) -> Callable[[], bytes]:
            def read() -> bytes:
                member = members()[name]
                return opened["tar"].extractfile(member).read()
            return read

        if names is None:
            names = list(members())
            if listing:
                try:
                    listing.parent.mkdir(parents=True, exist_ok=True)
                    tmp = listing.with_suffix(f".tmp{uuid.uuid4().hex}")
                    tmp.write_text(json.dumps(names))
                    os.replace(tmp, listing)  # atomic: a concurrent build reads the whole list or none
                except OSError:
                    pass  # only a shortcut for the next build; the decoded cache reports unwritable stores
        return [(n, f"{root}:{n}", reader(n)) for n in names], signature
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sig = hashlib.sha256()
    for p in files:
        sig.update(f"{p.relative_to(root)}:{p.stat().st_size}:{int(p.stat().st_mtime)}\n".encode())
    return [(str(p.relative_to(root)), str(p), p.read_bytes) for p in files], f"dir:{root.resolve()}:{sig.hexdigest()}"


def _class_layout(paths: list[str]) -> tuple[str, bool]:
    """The common prefix under which class (or split) folders live, and whether splits are given."""
    parts = [p.split("/") for p in paths]
    prefix: list[str] = []
    while True:
        heads = {p[len(prefix)] for p in parts if len(p) > len(prefix) + 1}
        files_here = any(len(p) == len(prefix) + 1 for p in parts)
        if len(heads) == 1 and not files_here:
            prefix.append(heads.pop())
            continue
        has_splits = bool(heads) and heads <= set(SPLITS) | {"valid", "validation"}
        return "/".join(prefix), has_splits


def imagefolder_source(cfg: Any, cache_dir: Path) -> Source:
    if not cfg.root:
        raise EdgebuildError("data=imagefolder needs a folder", "set data.root=/path/to/folder (or a .tar.gz of one)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise EdgebuildError(f"data folder {root} does not exist",
                             "point data.root to an existing ImageFolder or .tar.gz")
    entries, signature = _folder_entries(root, cache_dir)
    images_ = [e for e in entries if Path(e[0]).suffix.lower() in IMAGE_SUFFIXES]
    if not images_:
        raise EdgebuildError(f"no images found under {root}",
                             "use the layout ROOT/CLASS/IMAGE.jpg (or ROOT/train/CLASS/...)")
    prefix, has_splits = _class_layout([e[0] for e in images_])
    depth = len(prefix.split("/")) if prefix else 0

    def parse(rel: str) -> tuple[str, str]:
        parts = rel.split("/")[depth:]
        if has_splits:
            split = {"valid": "val", "validation": "val"}.get(parts[0], parts[0])
            return split, parts[1] if len(parts) > 2 else ""
        return "all", parts[0] if len(parts) > 1 else ""

    # class folders, including empty ones (a directory with no images is a mistake worth naming)
    class_names: set[str] = set()
    if root.is_dir():
        base = root / prefix if prefix else root
        for d in (base / s for s in SPLITS) if has_splits else [base]:
            if d.is_dir():
                class_names |= {c.name for c in d.iterdir() if c.is_dir()}
    class_names |= {parse(e[0])[1] for e in images_}
    class_names.discard("")
    names = sorted(class_names)
    if not names:
        raise EdgebuildError(f"no class folders under {root}",
                             "put images in one folder per class: ROOT/CLASS/IMAGE.jpg")
    counts = {n: 0 for n in names}
    for e in images_:
        if cls := parse(e[0])[1]:
            counts[cls] += 1
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise EdgebuildError(f"class folder(s) {', '.join(empty)} under {root} hold no images",
                             "add images to them or remove the empty folders")

    present = {parse(e[0])[0] for e in images_ if parse(e[0])[1]}
    origins = ({sp: f"folder {root}/{prefix + '/' if prefix else ''}{sp}" for sp in SPLITS}
               if present >= set(SPLITS) else None)  # otherwise every image is pooled and split by seed
    return Source(names, signature, load=lambda: _decode_folder(cfg, cache_dir, names, signature, images_, parse),
                  origins=origins, pool_origin=None if origins else f"folder {root}")


def limit_indices(n: int, limit: int) -> np.ndarray:
    """The `limit` of `n` pooled images data.limit keeps: seeded, in pool order (decode and split agree)."""
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def _decode_folder(cfg: Any, cache_dir: Path, names: list[str], signature: str, images_: list,
                   parse: Callable) -> Source:
    labelled = [(e, *parse(e[0])) for e in images_ if parse(e[0])[1]]
    by_split: dict[str, list] = {}
    for item in labelled:
        by_split.setdefault(item[1], []).append(item)
    key = f"{signature}|{cfg.image_size}|{cfg.channels}"
    if not set(by_split) >= {"train", "val", "test"} and cfg.limit and cfg.limit < len(labelled):
        # decode (and resize) only the images DataModule._limit keeps of the pool: all 50,000 CIFAR images
        # at 224x224 would take 7.5 GB; the pool order is the splits' in turn, as below
        pool_order = [item for items in by_split.values() for item in items]
        labelled = [pool_order[i] for i in limit_indices(len(pool_order), cfg.limit)]
        key += f"|limit {cfg.limit}"
    decoded = cache_dir / "decoded" / hashlib.sha256(key.encode()).hexdigest()
    npz = decoded.with_suffix(".npz")
    if npz.exists():
        z = np.load(npz, allow_pickle=False)
        split_names = [str(s) for s in z["splits"]]
        per = {s: Labelled(z[f"{s}_x"], z[f"{s}_y"]) for s in split_names}
    else:
        index = {n: i for i, n in enumerate(names)}
        buckets: dict[str, tuple[list, list]] = {}
        for (_, where, read), split, cls in labelled:
            img = _decode(read(), where)
            img = _resize(img.transpose(2, 0, 1)[None], cfg.image_size, cfg.channels)[0]
            xs, ys = buckets.setdefault(split, ([], []))
            xs.append(img)
            ys.append(index[cls])
        per = {s: Labelled(np.stack(x), np.asarray(y, dtype=np.int64)) for s, (x, y) in buckets.items()}
        npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_suffix(f".tmp{uuid.uuid4().hex}.npz")
        np.savez(tmp, splits=np.array(list(per)), **{f"{s}_x": v.images for s, v in per.items()},
                 **{f"{s}_y": v.labels for s, v in per.items()})
        tmp.replace(npz)
    if set(per) >= {"train", "val", "test"}:
        return Source(names, signature, splits=per)
    pool = Labelled(np.concatenate([v.images for v in per.values()]), np.concatenate([v.labels for v in per.values()]))
    return Source(names, signature, pool=pool)


def cifar10_source(cfg: Any, cache_dir: Path) -> Source:
    """torchvision's CIFAR10 from a local copy (data.root); never downloads."""
    root = Path(cfg.root or "~/.cache/torchvision").expanduser()
    if not (root / "cifar-10-batches-py").is_dir():
        raise EdgebuildError(f"CIFAR-10 not found under {root} (no cifar-10-batches-py folder)",
                             "set data.root to the folder holding cifar-10-batches-py, or use data=imagefolder")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def load() -> Source:
        from torchvision.datasets import CIFAR10

        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
        pool = Labelled(_resize(train.data.transpose(0, 3, 1, 2), cfg.image_size, cfg.channels),
                        np.asarray(train.targets, dtype=np.int64))
        held = Labelled(_resize(test.data.transpose(0, 3, 1, 2), cfg.image_size, cfg.channels),
                        np.asarray(test.targets, dtype=np.int64))
        return Source(names, signature, pool=pool, splits={"test": held})

    signature = f"cifar10:{root.resolve()}"
    return Source(names, signature, load=load, origins={"test": f"CIFAR-10 test batch in {root}"},
                  pool_origin=f"CIFAR-10 training batches in {root}", pool_name="the training batches")


SOURCES: dict[str, Callable[[Any, Path], Source]] = {
    "digits": digits_source,
    "synthetic": synthetic_source,
    "imagefolder": imagefolder_source,
    "cifar10": cifar10_source,
}


# ------------------------------------------------------------------------------------ datamodule
def _split_pool(pool: Labelled, val: float, test: float, seed: int, stratify: bool = True) -> dict[str, Labelled]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(pool.labels))
    strat = pool.labels if stratify else None
    rest, test_idx = (train_test_split(idx, test_size=test, random_state=seed, stratify=strat) if test > 0
                      else (idx, idx[:0]))
    val_rel = val / (1 - test) if test < 1 else 0
    strat_rest = pool.labels[rest] if stratify else None
    train_idx, val_idx = (train_test_split(rest, test_size=val_rel, random_state=seed, stratify=strat_rest) if val > 0
                          else (rest, rest[:0]))
    return {s: Labelled(pool.images[np.sort(i)], pool.labels[np.sort(i)])
            for s, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))}


class DataModule:
    """Splits, normalization and batches of one labelled image dataset (classification)."""

    sources = SOURCES  # a task's subclass serves its own sources (detection: edgebuild/detection/data.py)
    stratify = True  # split by seed keeping class proportions (labels must be class ids)

    def __init__(self, cfg: Any, cache_dir: Path):
        self.cfg = cfg
        if cfg.name not in self.sources:
            raise EdgebuildError(f"unknown data source {cfg.name!r}",
                                 f"use data= one of: {', '.join(sorted(self.sources))}")
        if len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels:
            raise EdgebuildError(f"data.mean/std need {cfg.channels} values (data.channels), "
                                 f"got {list(cfg.mean)} / {list(cfg.std)}")
        self._source = self.sources[cfg.name](cfg, Path(cache_dir) / "data")
        self.class_names = self._source.class_names
        self._splits: dict[str, Labelled] | None = None
        key = {k: v for k, v in _plain(cfg).items() if k not in ("batch_size", "num_workers", "calibration")}
        if isinstance(key.get("options"), dict):
            key["options"] = {k: v for k, v in key["options"].items() if k not in UNFINGERPRINTED_OPTIONS}
        identity = json.dumps([self._source.signature, key], sort_keys=True)
        self.fingerprint = hashlib.sha256(identity.encode()).hexdigest()
        self.input_shape = [1, cfg.channels, cfg.image_size, cfg.image_size]

    @property
    def splits(self) -> dict[str, Labelled]:
        if self._splits is None:
            source = self._source.load() if self._source.load else self._source
            size, channels = self.cfg.image_size, self.cfg.channels
            fit = lambda d: d if d.images.shape[1:] == (channels, size, size) else Labelled(  # noqa: E731
                _resize(d.images, size, channels), d.labels)
            splits = {k: fit(v) for k, v in (source.splits or {}).items()}
            if source.pool is not None:
                # a held-out test split that came with the data stays; the pool gives train and val
                test_frac = 0.0 if "test" in splits else self.cfg.split.test
                # limit before resizing: 50,000 CIFAR images upsampled to 224 would need 7.5 GB (uint8)
                pool = fit(self._limit(source.pool, self.cfg.limit))
                parts = _split_pool(pool, self.cfg.split.val, test_frac, self.cfg.split.seed, self.stratify)
                splits = {**parts, **splits} if "test" in splits else parts
            for s in SPLITS:
                if s not in splits or len(splits[s].labels) == 0:
                    raise EdgebuildError(f"data split {s!r} is empty ({self.cfg.name})",
                                         "use more images or larger data.split fractions")
            self._splits = splits
        return self._splits

    @property
    def signature(self) -> str:
        """What identifies the raw data (its source's signature; the fingerprint adds the data config)."""
        return self._source.signature

    def split_origins(self) -> dict[str, str]:
        """Where each split came from, for the summary: e.g. {"train": "data.yaml train: images/train2017
        (N images)", "val": ..., "test": "split from train by seed 0 (M images)"}."""
        src, seed = self._source, self.cfg.split.seed
        given = dict(src.origins or {})
        pool = src.pool_origin or (f"data={self.cfg.name}" if not given or set(given) < set(SPLITS) else None)
        counts = self._split_counts()
        out = {}
        for s in SPLITS:
            n = f" ({counts[s]} images)" if counts and s in counts else ""
            if s in given:
                out[s] = given[s] + n
            elif s == "train":
                out[s] = f"{pool}, less what val/test took by seed {seed}{n}"
            else:
                out[s] = f"split from {src.pool_name or pool} by seed {seed}{n}"
        return out

    def _split_counts(self) -> dict[str, int] | None:
        if self._splits is not None:
            return {s: len(v.labels) for s, v in self._splits.items()}
        sizes = self._source.sizes
        if not sizes:
            return None
        counts = {s: n for s, n in sizes.items() if s in SPLITS}
        if "pool" in sizes and not set(counts) >= set(SPLITS):
            n = min(sizes["pool"], self.cfg.limit or sizes["pool"])
            test = 0.0 if "test" in counts else self.cfg.split.test
            try:  # the same arithmetic as the split itself (stratification does not change the sizes)
                parts = _split_pool(Labelled(np.zeros((n, 1), np.uint8), np.zeros(n, np.int64)),
                                    self.cfg.split.val, test, seed=0, stratify=False)
            except ValueError:
                return None
            counts = {**{s: len(v.labels) for s, v in parts.items()}, **counts}
        return counts

    @staticmethod
    def _limit(pool: Labelled, limit: int | None) -> Labelled:
        if not limit or limit >= len(pool.labels):
            return pool
        idx = limit_indices(len(pool.labels), limit)
        return Labelled(pool.images[idx], pool.labels[idx])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def meta(self) -> dict[str, Any]:
        """Preprocessing a deployable needs: x = (uint8 / 255 - mean) / std, NCHW."""
        return {"input_shape": self.input_shape, "layout": "NCHW", "mean": list(self.cfg.mean),
                "std": list(self.cfg.std), "scale": 255.0, "class_names": self.class_names,
                "image_size": self.cfg.image_size, "channels": self.cfg.channels}

    def normalize(self, images: np.ndarray) -> np.ndarray:
        mean, std = self._mean_std
        return ((images.astype(np.float32) / 255.0) - mean) / std

    @functools.cached_property
    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        # once, from plain lists: np.asarray on an OmegaConf ListConfig probes attributes through OmegaConf's
        # exception machinery, 200 us per sample instead of 4
        return tuple(np.asarray(list(v), dtype=np.float32).reshape(1, -1, 1, 1) for v in (self.cfg.mean, self.cfg.std))

    def dataset(self, split: str, train: bool = False) -> Any:
        return _TensorImages(self, self.splits[split], augment=train and self.cfg.augment)

    def augmentation(self) -> tuple[int, bool]:
        """(crop padding in pixels, horizontal flip) of training batches; padding 0 = no crop."""
        pad = self.cfg.augment_pad
        return (max(1, self.cfg.image_size // 8) if pad is None else int(pad)), bool(self.cfg.augment_flip)

    def loader(self, split: str, train: bool = False, batch_size: int | None = None) -> Any:
        import torch
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

        g = torch.Generator().manual_seed(self.cfg.split.seed)
        bs = batch_size or self.cfg.batch_size
        # a short last training batch is dropped (its images come back shuffled in other epochs), as training
        # scripts do: its odd shape costs oneDNN new kernels twice an epoch, forward and backward
        drop_last = train and len(self.splits[split].labels) > bs
        if self.collate is None:  # images + class ids: whole batches sliced from one preloaded tensor
            ds = _TensorBatches(self, self.splits[split], self.augmentation() if train and self.cfg.augment else None)
            sampler = RandomSampler(ds, generator=g) if train else SequentialSampler(ds)
            return DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, bs, drop_last=drop_last),
                              num_workers=self.cfg.num_workers)
        return DataLoader(self.dataset(split, train), batch_size=bs, shuffle=train,
                          generator=g if train else None, num_workers=self.cfg.num_workers, drop_last=drop_last,
                          collate_fn=self.collate)

    collate = None  # torch's default collate for (image, label)

    def batches(self, split: str, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, Any]]:
        """Normalized float32 inputs and their targets, for evaluation on any runtime."""
        data = self.splits[split]
        n = min(len(data.labels), limit) if limit else len(data.labels)
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            yield self.normalize(data.images[i:j]), data.labels[i:j]

    def calibration(self) -> np.ndarray:
        """The representative calibration subset (from the train split): size and seed from config."""
        data = self.splits["train"]
        size = self.cfg.calibration.size
        if size > len(data.labels):
            log.warning("calibration subset of %d asked for, train split holds %d: using all %d",
                        size, len(data.labels), len(data.labels))
            size = len(data.labels)
        idx = np.sort(np.random.default_rng(self.cfg.calibration.seed).permutation(len(data.labels))[:size])
        return self.normalize(data.images[idx])

    def resized(self, image_size: int) -> DataModule:
        """The same splits served at another square size (a model whose input resolution was changed):
        training, calibration and evaluation of that model all follow. Views are made once."""
        if image_size == self.cfg.image_size:
            return self
        views = self.__dict__.setdefault("_views", {})
        if image_size not in views:
            view = copy.copy(self)
            view.cfg = copy.deepcopy(self.cfg)
            view.cfg.image_size = image_size
            view.input_shape = [1, self.cfg.channels, image_size, image_size]
            view.fingerprint = hashlib.sha256(f"{self.fingerprint}|{image_size}".encode()).hexdigest()
            view._splits = {k: Labelled(_resize(v.images, image_size, self.cfg.channels), v.labels)
                            for k, v in self.splits.items()}
            view._views = {}
            views[image_size] = view
        return views[image_size]


def for_input(dm: Any, input_shape: list[int] | None) -> Any:
    """The data as a model with `input_shape` [1,C,H,W] takes it: `dm` itself, or a resized view."""
    if not input_shape or list(input_shape)[1:] == list(dm.input_shape)[1:]:
        return dm
    c, h, w = list(input_shape)[1:]
    if h != w or c != dm.input_shape[1]:
        raise EdgebuildError(f"the model takes input {list(input_shape)}; the data serves {dm.input_shape}",
                             "only square resolution changes with the data's channel count are supported")
    return dm.resized(h)


def augment_batch(x: Any, pad: int, flip: bool, generator: Any = None) -> Any:
    """CIFAR-style augmentation of a float batch [B,C,H,W] on tensors, each image its own draw: a random
    crop of the `pad`-pixel reflect-padded image and a horizontal flip with probability 1/2."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    if flip:
        m = torch.rand(b, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    if pad > 0:
        p = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        p = p.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
        x = p.gather(3, cols)
    return x.contiguous()


class _TensorBatches:
    """A split as one uint8 tensor; `ds[indices]` is a normalized (and augmented) float batch. Served
    through a BatchSampler, so per-sample Python work and collation disappear from the training step."""

    def __init__(self, dm: DataModule, data: Labelled, augment: tuple[int, bool] | None):
        import torch

        self.x, self.y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
        mean, std = dm._mean_std
        self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: Any) -> tuple[Any, Any]:
        import torch

        idx = torch.as_tensor(idx)
        x = self.x[idx].float().div_(255.0).sub_(self.mean).div_(self.std)
        if self.augment is not None:
            x = augment_batch(x, *self.augment)
        return x, self.y[idx]


class _TensorImages:
    def __init__(self, dm: DataModule, data: Labelled, augment: bool):
        self.dm, self.data, self.augment = dm, data, augment

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        x = self.data.images[i]
        if self.augment:  # CIFAR-style: random 4-pixel-padded crop and horizontal flip
            pad = max(1, x.shape[-1] // 8)
            p = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            r = np.random.randint(0, 2 * pad + 1, size=2)
            x = p[:, r[0]:r[0] + x.shape[1], r[1]:r[1] + x.shape[2]]
            if np.random.rand() < 0.5:
                x = x[:, :, ::-1]
        return torch.from_numpy(self.dm.normalize(np.ascontiguousarray(x)[None])[0]), int(self.data.labels[i])


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
