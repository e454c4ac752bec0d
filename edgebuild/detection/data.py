"""Detection data: images with boxes, from the `shapes` generator or YOLO / COCO / Pascal VOC folders.

Every source yields uint8 images [N,C,S,S] at `data.image_size` (S; images are resized to a square,
boxes scaled with them) and one target per image: {"boxes": float32 [k,4] x1 y1 x2 y2 in pixels of the
S x S input, "labels": int64 [k] class index}. An image without objects is background only.
Annotations are read and checked when the build is planned (before any work); pixels are decoded
once, lazily, and cached. `DetectionDataModule` serves them like classification data (splits,
normalization, calibration subset) with list-of-dict targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.data import IMAGE_SUFFIXES, SPLITS, DataModule, Labelled, Source, _decode
from edgebuild.errors import EdgebuildError

log = logging.getLogger(__name__)
SHAPES = ("circle", "square", "triangle", "diamond")
SPLIT_ALIASES = {"valid": "val", "validation": "val"}
EDGE_TOLERANCE = 0.01  # of the image size: annotation tools round boxes onto or just past the border


def _target(boxes: Any = (), labels: Any = ()) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.asarray(labels, dtype=np.int64)}


def _targets(items: list[dict[str, np.ndarray]]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # one dict per image; splits and limits index it like labels
    out[:] = items
    return out


# -------------------------------------------------------------------------------------- shapes
def shapes_source(cfg: Any, cache_dir: Path) -> Source:
    """Generated, seeded images: 1-3 non-overlapping shapes (circle, square, triangle, diamond; the
    first data.num_classes kinds) in random colours on noisy colour gradients, with exact boxes."""
    k = cfg.num_classes
    if not 1 <= k <= len(SHAPES):
        raise EdgebuildError(f"data=shapes draws at most {len(SHAPES)} kinds of shape; data.num_classes={k}",
                             f"set data.num_classes between 1 and {len(SHAPES)}")
    names = list(SHAPES[:k])
    signature = f"shapes-v1-{cfg.num_samples}-{k}-{cfg.image_size}-{cfg.channels}-{cfg.split.seed}"
    return Source(names, signature, load=lambda: Source(names, signature, pool=generate_shapes(
        cfg.num_samples, k, cfg.image_size, cfg.channels, cfg.split.seed)))


def generate_shapes(n: int, num_classes: int, size: int, channels: int, seed: int) -> Labelled:
    rng = np.random.default_rng(seed + 4321)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    targets = []
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1) / 2
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * ramp + rng.normal(0, 12, (3, size, size))
        boxes, labels = [], []
        for _ in range(rng.integers(1, 4)):
            for _attempt in range(30):  # place without overlapping what is already drawn
                r = rng.uniform(0.08, 0.22) * size
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                box = np.array([cx - r, cy - r, cx + r, cy + r])
                if all(_overlap(box, b) == 0 for b in boxes):
                    break
            else:
                continue
            kind = int(rng.integers(num_classes))
            dx, dy = np.abs(xx - cx), yy - cy
            mask = {"circle": dx**2 + dy**2 <= r**2, "square": np.maximum(dx, np.abs(dy)) <= r * 0.85,
                    "triangle": (dy <= r * 0.8) & (dx <= (dy + r) * 0.55),
                    "diamond": dx + np.abs(dy) <= r}[SHAPES[kind]]
            if not mask.any():
                continue
            under = img[:, mask].mean(axis=1)
            colour = rng.uniform(0, 255, 3)
            while np.abs(colour - under).sum() < 150:  # keep the shape visible against its background
                colour = rng.uniform(0, 255, 3)
            img[:, mask] = colour[:, None] + rng.normal(0, 8, (3, int(mask.sum())))
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(kind)
        images[i] = img.clip(0, 255).round().astype(np.uint8)
        targets.append(_target(boxes, labels))
    if channels == 1:
        images = images.mean(axis=1, keepdims=True).round().astype(np.uint8)
    elif channels != 3:
        raise EdgebuildError(f"data=shapes makes 1- or 3-channel images, not {channels}", "set data.channels to 1 or 3")
    return Labelled(images, _targets(targets))


def _overlap(a: np.ndarray, b: Any) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


# ------------------------------------------------------------------------ annotated image folders
@dataclass
class Record:
    """One annotated image, checked: boxes normalized to 0..1 (x1 y1 x2 y2)."""

    split: str  # train | val | test | all (split by seed)
    image: Path
    boxes: np.ndarray
    labels: np.ndarray


def _check_box(box: list[float], where: str) -> list[float]:
    """Normalized x1 y1 x2 y2 -> the same, clamped onto the image; outside it or empty -> error."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise EdgebuildError(f"{where}: box {_fmt(box)} has zero area", "remove the box or fix its size")
    t = EDGE_TOLERANCE
    if x1 < -t or y1 < -t or x2 > 1 + t or y2 > 1 + t:
        raise EdgebuildError(f"{where}: box {_fmt(box)} (x1 y1 x2 y2, as fractions of the image) lies outside "
                             "the image", "fix the annotation: boxes must lie within the image")
    return [max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)]


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in box) + "]"


def _check_label(label: int, num_classes: int, where: str, names_from: str) -> int:
    if not 0 <= label < num_classes:
        raise EdgebuildError(f"{where}: class id {label} is not below the number of classes "
                             f"({num_classes}, {names_from})",
                             "fix the label, or list every class name (data.options.names or the dataset's yaml)")
    return label


def _split_of(rel: Path) -> str:
    first = rel.parts[0] if len(rel.parts) > 1 else ""
    first = SPLIT_ALIASES.get(first, first)
    return first if first in SPLITS else "all"


def _root(cfg: Any, kind: str) -> Path:
    if not cfg.root:
        raise EdgebuildError(f"data={kind} needs a folder", f"set data.root=/path/to/{kind}-dataset")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise EdgebuildError(f"data folder {root} does not exist", f"point data.root to a {kind} dataset folder")
    return root


def _names_yaml(root: Path) -> list[str] | None:
    """Class names from a YOLO dataset yaml in the root (`names:` as a list or an {id: name} map)."""
    from omegaconf import OmegaConf

    for path in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")):
        names = OmegaConf.to_container(OmegaConf.load(path)).get("names")
        if isinstance(names, dict):
            return [str(names[i]) for i in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    return None


def yolo_source(cfg: Any, cache_dir: Path) -> Source:
    """ROOT/images/[SPLIT/]NAME.jpg with ROOT/labels/[SPLIT/]NAME.txt: one `class cx cy w h` line per box,
    normalized to 0..1. Class names: data.options.names, a yaml in ROOT with `names:`, or class0.. up
    to data.num_classes. An image without a label file holds no objects (background only)."""
    root = _root(cfg, "yolo")
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise EdgebuildError(f"no images/ folder in {root}",
                             "use the YOLO layout ROOT/images/[train/]x.jpg + ROOT/labels/[train/]x.txt")
    given, in_yaml = cfg.options.get("names"), _names_yaml(root)
    names = list(given or in_yaml or [f"class{i}" for i in range(cfg.num_classes)])
    names_from = "data.options.names" if given else "the dataset yaml" if in_yaml else "data.num_classes"
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.relative_to(images_dir).with_suffix("") for p in images}
    orphans = [p for p in labels_dir.rglob("*.txt") if p.relative_to(labels_dir).with_suffix("") not in stems] \
        if labels_dir.is_dir() else []
    if orphans:
        wanted = images_dir / orphans[0].relative_to(labels_dir).with_suffix(".*")
        raise EdgebuildError(f"label file {orphans[0]} has no image (looked for {wanted})",
                             "add the image or remove the label file")
    records, background = [], 0
    for image in images:
        rel = image.relative_to(images_dir)
        label_file = (labels_dir / rel).with_suffix(".txt")
        boxes, labels = [], []
        lines = label_file.read_text().splitlines() if label_file.exists() else []
        background += not label_file.exists()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{label_file}:{n}"
            fields = line.split()
            try:
                cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
            except (ValueError, TypeError):
                raise EdgebuildError(f"{where}: expected 'class cx cy w h', got {line.strip()!r}",
                                     "write one box per line: integer class id and 4 normalized numbers") from None
            labels.append(_check_label(cls, len(names), where, names_from))
            boxes.append(_check_box([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], where))
        records.append(Record(_split_of(rel), image, *_arrays(boxes, labels)))
    if background:
        log.info("yolo: %d of %d images have no label file: used as background-only images", background, len(images))
    return _annotated_source(cfg, cache_dir, names, records, [root / "images", root / "labels"])


def _per_split(value: Any) -> dict[str, Any]:
    return {SPLIT_ALIASES.get(k, k): v for k, v in value.items()} if isinstance(value, dict) else {"all": value}


def coco_source(cfg: Any, cache_dir: Path) -> Source:
    """COCO instances json: data.options.annotations (a file, or {train: file, val: file, ...}; default
    ROOT/annotations.json), image file_name relative to data.options.images (default ROOT; may also
    be per split). Crowd boxes are skipped. Class names are the categories, in id order."""
    root = _root(cfg, "coco")
    anns = _per_split(cfg.options.get("annotations") or "annotations.json")
    image_dirs = _per_split(cfg.options.get("images") or ".")
    names: list[str] | None = None
    records: list[Record] = []
    files = []
    for split, ann_path in anns.items():
        path = root / ann_path
        if not path.is_file():
            raise EdgebuildError(f"COCO annotation file {path} does not exist",
                                 "set data.options.annotations=FILE.json (relative to data.root)")
        files.append(path)
        coco = json.loads(path.read_text())
        categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
        if names is None:
            names = [c["name"] for c in categories]
        elif names != [c["name"] for c in categories]:
            raise EdgebuildError(f"{path}: categories differ from the other annotation files",
                                 "use one category list for every split")
        index = {c["id"]: i for i, c in enumerate(categories)}
        per_image: dict[int, tuple[list, list]] = {im["id"]: ([], []) for im in coco["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco.get("annotations", []):
            where = f"{path}: annotation {a.get('id')} (image {a['image_id']})"
            if a.get("iscrowd"):
                continue
            if a["image_id"] not in per_image:
                raise EdgebuildError(f"{where} names an image id that is not in 'images'", "fix the annotation file")
            if a["category_id"] not in index:
                raise EdgebuildError(f"{where}: category id {a['category_id']} is not in 'categories'",
                                     "fix the annotation file")
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            per_image[a["image_id"]][0].append(_check_box([x / w, y / h, (x + bw) / w, (y + bh) / h], where))
            per_image[a["image_id"]][1].append(index[a["category_id"]])
        image_dir = root / image_dirs.get(split, image_dirs.get("all", "."))
        for im in coco["images"]:
            file = image_dir / im["file_name"]
            if not file.is_file():
                raise EdgebuildError(f"{path}: image {im['file_name']} (id {im['id']}) does not exist at {file}",
                                     "set data.options.images to the folder holding the images, or fix file_name")
            boxes, labels = per_image[im["id"]]
            records.append(Record(split, file, *_arrays(boxes, labels)))
    return _annotated_source(cfg, cache_dir, names or [], records, files)


def voc_source(cfg: Any, cache_dir: Path) -> Source:
    """Pascal VOC: ROOT/Annotations/*.xml naming images in ROOT/JPEGImages; splits from
    ROOT/ImageSets/Main/{train,val,test}.txt when present. VOC's 1-based inclusive pixel corners
    become x1 = xmin - 1, x2 = xmax. `difficult` objects are skipped unless data.options.keep_difficult.
    Class names: data.options.names, else every name found, sorted."""
    root = _root(cfg, "voc")
    xmls = sorted((root / "Annotations").glob("*.xml"))
    if not xmls:
        raise EdgebuildError(f"no Annotations/*.xml under {root}",
                             "use the Pascal VOC layout (Annotations/, JPEGImages/)")
    split_of: dict[str, str] = {}
    for split in SPLITS:
        ids = root / "ImageSets" / "Main" / f"{split}.txt"
        if ids.is_file():
            split_of.update({line.split()[0]: split for line in ids.read_text().splitlines() if line.strip()})
    parsed = []
    for x in xmls:
        try:
            tree = ET.parse(x).getroot()
        except ET.ParseError as e:
            raise EdgebuildError(f"cannot parse {x}: {e}", "fix or remove the annotation file") from None
        parsed.append((x, tree))
    given = cfg.options.get("names")
    found = {o.findtext("name", "").strip() for _, t in parsed for o in t.iter("object")}
    names = list(given) if given else sorted(found)
    index = {n: i for i, n in enumerate(names)}
    keep_difficult = bool(cfg.options.get("keep_difficult", False))
    records = []
    for x, tree in parsed:
        file = root / "JPEGImages" / tree.findtext("filename", "").strip()
        if not file.is_file():
            raise EdgebuildError(f"{x} names image {file.name!r}, which does not exist in {file.parent}",
                                 "add the image or remove the annotation")
        w, h = float(tree.findtext("size/width", "0")), float(tree.findtext("size/height", "0"))
        if w <= 0 or h <= 0:
            raise EdgebuildError(f"{x}: missing or zero <size>", "give the image's width and height in <size>")
        boxes, labels = [], []
        for o in tree.iter("object"):
            name = o.findtext("name", "").strip()
            if o.findtext("difficult", "0").strip() == "1" and not keep_difficult:
                continue
            if name not in index:
                raise EdgebuildError(f"{x}: class {name!r} is not in data.options.names",
                                     "add it to data.options.names")
            xmin, ymin, xmax, ymax = (float(o.findtext(f"bndbox/{k}", "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append(_check_box([(xmin - 1) / w, (ymin - 1) / h, xmax / w, ymax / h], f"{x}: object {name!r}"))
            labels.append(index[name])
        records.append(Record(split_of.get(x.stem, "all"), file, *_arrays(boxes, labels)))
    return _annotated_source(cfg, cache_dir, names, records, [root / "Annotations"])


def _arrays(boxes: list, labels: list) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _annotated_source(cfg: Any, cache_dir: Path, names: list[str], records: list[Record],
                      watched: list[Path]) -> Source:
    """Checked records -> a lazily decoded Source; given train/val/test folders are kept, a missing
    test split is taken from val, whatever is not held out is split by seed."""
    if not records:
        raise EdgebuildError(f"no images found under {cfg.root}", f"see the data={cfg.name} layout in the README")
    sig = hashlib.sha256()
    for w in watched:
        for p in sorted(w.rglob("*")) if w.is_dir() else [w]:
            if p.is_file():
                sig.update(f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}\n".encode())
    for r in records:
        sig.update(f"{r.split}:{r.image}:{r.image.stat().st_size}:{int(r.image.stat().st_mtime)}\n".encode())
    signature = f"{cfg.name}:{sig.hexdigest()}"
    return Source(names, signature, load=lambda: _decode_records(cfg, cache_dir, names, signature, records))


def _decode_records(cfg: Any, cache_dir: Path, names: list[str], signature: str, records: list[Record]) -> Source:
    from PIL import Image

    size, channels = cfg.image_size, cfg.channels
    npz = cache_dir / "decoded" / (hashlib.sha256(f"{signature}|{size}|{channels}".encode()).hexdigest() + ".npz")
    if npz.exists():
        images = np.load(npz, allow_pickle=False)["images"]
    else:
        images = np.empty((len(records), channels, size, size), dtype=np.uint8)
        for i, r in enumerate(records):
            rgb = Image.fromarray(_decode(r.image.read_bytes(), str(r.image))).resize((size, size), Image.BILINEAR)
            pixels = np.asarray(rgb.convert("L"))[None] if channels == 1 else np.asarray(rgb).transpose(2, 0, 1)
            images[i] = pixels
        npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_suffix(f".tmp{uuid.uuid4().hex}.npz")
        np.savez(tmp, images=images)
        tmp.replace(npz)
    targets = [_target(r.boxes * size, r.labels) for r in records]
    by_split: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_split.setdefault(r.split, []).append(i)
    part = lambda idx: Labelled(images[idx], _targets([targets[i] for i in idx]))  # noqa: E731
    given = {s: part(i) for s, i in by_split.items() if s in SPLITS}
    if set(given) >= set(SPLITS):
        return Source(names, signature, splits=given)
    held = given.get("test") or given.get("val")
    pool_idx = [i for s, idx in by_split.items() if s not in ("test", "val") or (s == "val" and "test" in given)
                for i in idx] if held is not None else list(range(len(records)))
    if not pool_idx:
        raise EdgebuildError(f"{cfg.root}: only held-out images, nothing to train on", "add a train split")
    return Source(names, signature, pool=part(pool_idx), splits={"test": held} if held is not None else None)


SOURCES: dict[str, Callable[[Any, Path], Source]] = {
    "shapes": shapes_source,
    "yolo": yolo_source,
    "coco": coco_source,
    "voc": voc_source,
}


class DetectionDataModule(DataModule):
    """Images with list-of-dict targets: batches yield (float32 inputs, [{"boxes", "labels"}, ...])."""

    sources = SOURCES
    stratify = False  # targets are box lists, not class ids
    background_classes = 1  # what a torchvision detector's num_classes counts besides the objects

    def dataset(self, split: str, train: bool = False) -> Any:
        return _BoxImages(self, self.splits[split], augment=train and self.cfg.augment)

    @staticmethod
    def collate(batch: list) -> tuple[Any, list[dict[str, Any]]]:
        import torch

        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    def resized(self, image_size: int) -> DataModule:
        if image_size == self.cfg.image_size:
            return self
        raise EdgebuildError(f"a detection model's input size cannot change within a build "
                             f"({self.cfg.image_size} -> {image_size})",
                             "set data.image_size instead")


class _BoxImages:
    def __init__(self, dm: DetectionDataModule, data: Labelled, augment: bool):
        self.dm, self.data, self.augment = dm, data, augment

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        import torch

        x, t = self.data.images[i], self.data.labels[i]
        boxes = t["boxes"].copy()
        if self.augment and np.random.rand() < 0.5:  # horizontal flip, boxes mirrored with the pixels
            x = np.ascontiguousarray(x[:, :, ::-1])
            width = x.shape[-1]
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        return torch.from_numpy(self.dm.normalize(x[None])[0]), {"boxes": torch.from_numpy(boxes),
                                                                  "labels": torch.from_numpy(t["labels"])}
