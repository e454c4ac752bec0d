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

from edgebuild.data import IMAGE_SUFFIXES, SPLITS, DataModule, Labelled, Source, _decode, data_option
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
            mask = shape_mask(SHAPES[kind], xx, yy, cx, cy, r)
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


def shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """The pixels (centres xx, yy) a shape of `kind` and size r centred at (cx, cy) covers; the stream's
    moving-shapes video (edgebuild/stream/sources.py) draws the same shapes."""
    dx, dy = np.abs(xx - cx), yy - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return np.maximum(dx, np.abs(dy)) <= r * 0.85
    if kind == "triangle":
        return (dy <= r * 0.8) & (dx <= (dy + r) * 0.55)
    return dx + np.abs(dy) <= r  # diamond


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


YAML_SPLIT_KEYS = ("train", "val", "test")
SHOWN = 5  # paths shown in a warning


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as e:
        raise EdgebuildError(f"cannot read the dataset yaml {path}: {e}", "fix the yaml") from None
    return spec if isinstance(spec, dict) else {}


def _dataset_yaml(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The YOLO dataset yaml: data.root itself (a .yaml file), or in the root folder the first yaml that
    names splits (data.yaml first), else the first with `names:`."""
    if root.is_file():
        return root, _load_yaml(root)
    found = [(p, _load_yaml(p)) for p in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))]
    found.sort(key=lambda f: f[0].name not in ("data.yaml", "data.yml"))
    for want in (lambda d: any(d.get(k) for k in YAML_SPLIT_KEYS), lambda d: d.get("names") is not None):
        for path, spec in found:
            if want(spec):
                return path, spec
    return None


def _yaml_names(spec: dict[str, Any] | None) -> list[str] | None:
    """Class names from a YOLO dataset yaml (`names:` as a list or an {id: name} map)."""
    names = (spec or {}).get("names")
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    if isinstance(names, list):
        return [str(n) for n in names]
    return None


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ of the image's path becomes /labels/, the suffix .txt; an image
    with no images/ folder in its path has its label file beside it."""
    s = str(image)
    sep = "/images/"
    return Path("/labels/".join(s.rsplit(sep, 1)) if sep in s else s).with_suffix(".txt")


def _read_label(label_file: Path, names: list[str], names_from: str) -> tuple[list, list]:
    boxes, labels = [], []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
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
    return boxes, labels


def _shown(paths: list[Path]) -> str:
    more = f", ... ({len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
    return ", ".join(str(p) for p in paths[:SHOWN]) + more


def _stray_labels(cfg: Any, strays: list[Path], looked_for: Callable[[Path], str]) -> None:
    """Label files without an image: a warning (real exports have them), an error with data.options.strict."""
    if not strays:
        return
    if data_option(cfg, "strict"):
        raise EdgebuildError(f"label file {strays[0]} has no image (looked for {looked_for(strays[0])}); "
                             f"{len(strays)} label file(s) without an image: {_shown(strays)}",
                             "add the images or remove the label files, or unset data.options.strict to warn "
                             "and go on")
    log.warning("yolo: %d label file(s) have no image and are ignored (data.options.strict=true makes this an "
                "error): %s", len(strays), _shown(strays))


def _yolo_records(images: list[tuple[str, Path, Path]], names: list[str], names_from: str) -> list[Record]:
    """(split, image, label file) -> checked records; images without a label file are background only."""
    records, unlabelled = [], []
    for split, image, label_file in images:
        found = label_file.is_file()
        if not found:
            unlabelled.append(image)
        boxes, labels = _read_label(label_file, names, names_from) if found else ([], [])
        records.append(Record(split, image, *_arrays(boxes, labels)))
    if unlabelled:
        log.warning("yolo: %d of %d images have no label file and are used as background-only images: %s",
                    len(unlabelled), len(images), _shown(unlabelled))
    return records


def yolo_source(cfg: Any, cache_dir: Path) -> Source:
    """A YOLO dataset. With a dataset yaml (data.root=FILE.yaml, or a yaml in data.root) that names splits
    (`path:`, `train:`, `val:`, `test:`; each a folder, a list of folders or a .txt of image paths), the yaml's
    splits are used, label files found the Ultralytics way (`label_path`). Otherwise ROOT/images/[SPLIT/]NAME.jpg
    with ROOT/labels/[SPLIT/]NAME.txt. One `class cx cy w h` line per box, normalized to 0..1. Class names:
    data.options.names, the yaml's `names:`, or class0.. up to data.num_classes. An image without a label
    file holds no objects (background only); a label file without an image is warned about and ignored
    (an error with data.options.strict=true)."""
    if not cfg.root:
        raise EdgebuildError("data=yolo needs a folder", "set data.root=/path/to/yolo-dataset (or its data.yaml)")
    given_root = Path(cfg.root).expanduser()
    root = given_root if given_root.is_file() and given_root.suffix in (".yaml", ".yml") else _root(cfg, "yolo")
    found = _dataset_yaml(root)
    spec = found[1] if found else None
    given, in_yaml = cfg.options.get("names"), _yaml_names(spec)
    names = list(given or in_yaml or [f"class{i}" for i in range(cfg.num_classes)])
    names_from = "data.options.names" if given else "the dataset yaml" if in_yaml else "data.num_classes"
    if found and any(spec.get(k) for k in YAML_SPLIT_KEYS):
        return _yolo_yaml_source(cfg, cache_dir, found[0], spec, names, names_from)
    if root.is_file():
        raise EdgebuildError(f"{root} names no split (train:, val:, test:)",
                             "add `train: images/train` (and val:, test:) to the yaml, or set data.root to the "
                             "dataset folder")
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise EdgebuildError(f"no images/ folder in {root}",
                             "use the YOLO layout ROOT/images/[train/]x.jpg + ROOT/labels/[train/]x.txt, or a "
                             "data.yaml with train:/val: paths")
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.relative_to(images_dir).with_suffix("") for p in images}
    strays = sorted(p for p in labels_dir.rglob("*.txt") if p.relative_to(labels_dir).with_suffix("") not in stems) \
        if labels_dir.is_dir() else []
    _stray_labels(cfg, strays, lambda p: str(images_dir / p.relative_to(labels_dir).with_suffix(".*")))
    records = _yolo_records([(_split_of(p.relative_to(images_dir)), p,
                              (labels_dir / p.relative_to(images_dir)).with_suffix(".txt")) for p in images],
                            names, names_from)
    origin = {s: f"folder {images_dir / s}" for s in SPLITS}
    origin["all"] = f"folder {images_dir} (images outside train/val/test folders)"
    return _annotated_source(cfg, cache_dir, names, records, [root / "images", root / "labels"], origin)


def _yolo_yaml_source(cfg: Any, cache_dir: Path, yaml_path: Path, spec: dict[str, Any], names: list[str],
                      names_from: str) -> Source:
    """The splits a dataset yaml names, as given (no pooling): see `yolo_source`."""
    base_given = spec.get("path")
    base = yaml_path.parent if not base_given else Path(str(base_given)).expanduser()
    base = base if base.is_absolute() else yaml_path.parent / base
    if not base.is_dir():
        raise EdgebuildError(f"{yaml_path}: path: {base_given} does not exist (looked for {base})",
                             "fix `path:` in the yaml (absolute, or relative to the yaml's folder), or remove it "
                             "to use the yaml's folder")
    if not spec.get("train"):
        raise EdgebuildError(f"{yaml_path} names no train: split", "add `train: images/train` to the yaml")
    entries: list[tuple[str, Path, Path]] = []
    watched, lists, label_dirs, label_trees = [yaml_path], set(), set(), set()
    origin, seen = {}, {}
    for key in YAML_SPLIT_KEYS:
        value = spec.get(key)
        if not value:
            continue
        images = []
        for entry in value if isinstance(value, list) else [value]:
            path = Path(str(entry)).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                raise EdgebuildError(f"{yaml_path}: {key}: {entry} does not exist (looked for {path})",
                                     f"fix `{key}:` in the yaml (a folder of images, a list of folders or a .txt "
                                     f"of image paths, relative to path: {base}), or remove it")
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                label_trees.add(label_path(path / "x").parent)
            elif path.suffix == ".txt":
                found = _image_list(path, base)
                lists.add(path)
                label_dirs |= {label_path(p).parent for p in found}
            else:
                raise EdgebuildError(f"{yaml_path}: {key}: {entry} is neither a folder nor a .txt list of images",
                                     f"point `{key}:` to a folder of images, a list of them, or a .txt of paths")
            if not found:
                raise EdgebuildError(f"{yaml_path}: {key}: {entry} holds no images (looked in {path})",
                                     f"put the {key} images there, or fix `{key}:` in the yaml")
            images += found
            watched.append(path)
        shown = value if not isinstance(value, list) else "[" + ", ".join(map(str, value)) + "]"
        origin[key] = f"{yaml_path.name} {key}: {shown}"
        for other, had in seen.items():
            shared = len(had & set(images))
            if shared:
                log.warning("%s: %s: and %s: share %d image(s): the %s numbers measure images the model %s",
                            yaml_path, other, key, shared, key, "trained on" if other == "train" else "also sees")
                origin[key] += f" (shares {shared} images with {other})"
        seen[key] = set(images)
        entries += [(key, p, label_path(p)) for p in images]
    wanted = {e[2] for e in entries}
    labels_found = {p for d in label_trees if d.is_dir() for p in d.rglob("*.txt")}
    labels_found |= {p for d in label_dirs if d.is_dir() for p in d.glob("*.txt")}
    strays = sorted(p for p in labels_found if p not in wanted and p not in lists and p.name != "classes.txt")
    _stray_labels(cfg, strays, _image_for)
    records = _yolo_records(entries, names, names_from)
    watched += sorted(label_trees | label_dirs)
    return _annotated_source(cfg, cache_dir, names, records, watched, origin, from_yaml=True)


def _image_for(label: Path) -> str:
    """Where the image of a label file would be (the inverse of `label_path`), for messages."""
    s, sep = str(label), "/labels/"
    return str(Path("/images/".join(s.rsplit(sep, 1)) if sep in s else s).with_suffix(".*"))


def _image_list(path: Path, base: Path) -> list[Path]:
    """A .txt of image paths, one a line, relative to the yaml's `path:` (or to the list's folder), or absolute."""
    images = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        p = Path(line.strip()).expanduser()
        candidates = [p] if p.is_absolute() else [base / p, path.parent / p]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise EdgebuildError(f"{path}:{n} names image {line.strip()}, which does not exist "
                                 f"(looked for {candidates[0]})", "add the image or remove the line")
        images.append(hit)
    return images


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
    keep_difficult = data_option(cfg, "keep_difficult")
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


def _plan(present: list[str], from_yaml: bool) -> tuple[dict[str, str], list[str]]:
    """Which record splits serve which split: ({split: record split} given as is, [record splits pooled and
    split by seed]). A dataset yaml's splits are kept (no test: the val images serve as test too; only train:
    val and test are split from it). Folders: given train/val/test are kept, a missing test split is taken
    from val, whatever is not held out is pooled."""
    given = {s: s for s in SPLITS if s in present}
    if from_yaml and "val" in given and "test" not in given:
        given["test"] = "val"
    if set(given) >= set(SPLITS):
        return given, []
    if from_yaml:
        return {s: r for s, r in given.items() if s == "test"}, ["train"]
    held = "test" if "test" in given else "val" if "val" in given else None
    pool = [s for s in present if s not in ("test", "val") or (s == "val" and held == "test")]
    return ({"test": held} if held else {}), pool


def _annotated_source(cfg: Any, cache_dir: Path, names: list[str], records: list[Record],
                      watched: list[Path], origin: dict[str, str] | None = None, from_yaml: bool = False) -> Source:
    """Checked records -> a lazily decoded Source, split as `_plan` says; `origin` describes each record
    split for the summary."""
    if not records:
        raise EdgebuildError(f"no images found under {cfg.root}", f"see the data={cfg.name} layout in the README")
    # the class names themselves: they may come from a yaml that is not watched (YOLO's images/ + labels/
    # layout reads only its `names:`), and a rename can keep the file's size and mtime second
    sig = hashlib.sha256(json.dumps(names).encode() + b"\n")
    for w in watched:
        for p in sorted(w.rglob("*")) if w.is_dir() else [w]:
            if p.is_file():
                sig.update(f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}\n".encode())
    for r in records:
        sig.update(f"{r.split}:{r.image}:{r.image.stat().st_size}:{int(r.image.stat().st_mtime)}\n".encode())
    signature = f"{cfg.name}:{sig.hexdigest()}"
    present = list(dict.fromkeys(r.split for r in records))
    given, pool = _plan(present, from_yaml)
    counts = {s: sum(r.split == s for r in records) for s in present}
    origin = origin or {}
    describe = lambda s: origin.get(s, "the annotations" if s == "all" else f"the {s} annotations")  # noqa: E731
    return Source(names, signature, load=lambda: _decode_records(cfg, cache_dir, names, signature, records, from_yaml),
                  origins={s: describe(r) + (" (no test: in the yaml: val serves as test)" if from_yaml and s != r
                                             else "") for s, r in given.items()},
                  pool_origin=", ".join(describe(s) for s in pool) if pool else None,
                  pool_name="train" if pool == ["train"] else None,
                  sizes={**{s: counts[r] for s, r in given.items()}, "pool": sum(counts[s] for s in pool)})


def _decode_records(cfg: Any, cache_dir: Path, names: list[str], signature: str, records: list[Record],
                    from_yaml: bool = False) -> Source:
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
    given, pool = _plan(list(by_split), from_yaml)
    splits = {s: part(by_split[r]) for s, r in given.items()}
    if set(splits) >= set(SPLITS):
        return Source(names, signature, splits=splits)
    # the pool's order decides the seeded split: nothing held out -> file order, else split by split
    pool_idx = ([i for s, idx in by_split.items() if s in pool for i in idx] if splits
                else [i for i, r in enumerate(records) if r.split in pool])
    if not pool_idx:
        raise EdgebuildError(f"{cfg.root}: only held-out images, nothing to train on", "add a train split")
    return Source(names, signature, pool=part(pool_idx), splits=splits or None)


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
