"""Detection data: the shapes generator, YOLO / COCO / VOC loaders on hand-written fixtures (boxes
converted exactly), bad annotations (one clear message naming the file), classification data unchanged."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from edgebuild import testing
from edgebuild.data import DataModule
from edgebuild.detection.data import DetectionDataModule, generate_shapes
from edgebuild.errors import EdgebuildError


def det_data(tmp_path, *overrides):
    cfg = testing.compose(testing.shrink(tmp_path) + ["task=detection", "data=shapes", *overrides]).data
    return DetectionDataModule(cfg, tmp_path / "cache")


def image(path, width=64, height=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 200)).save(path)


def test_shapes_are_deterministic_by_seed_with_boxes_inside_the_image():
    a, b, c = generate_shapes(12, 3, 48, 3, 0), generate_shapes(12, 3, 48, 3, 0), generate_shapes(12, 3, 48, 3, 1)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert all(np.array_equal(x["boxes"], y["boxes"]) for x, y in zip(a.labels, b.labels, strict=True))
    boxes = np.concatenate([t["boxes"] for t in a.labels])
    labels = np.concatenate([t["labels"] for t in a.labels])
    assert 12 <= len(boxes) <= 36 and (boxes >= 0).all() and (boxes <= 48).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and set(labels) <= {0, 1, 2}
    # a box is the shape's exact extent: the pixels on its border differ from the background
    t = a.labels[0]
    x1, y1, x2, y2 = t["boxes"][0].astype(int)
    assert a.images[0].shape == (3, 48, 48) and x2 - x1 >= 6


def test_shapes_datamodule_serves_normalized_batches_and_box_targets(tmp_path):
    dm = det_data(tmp_path, "data.num_samples=40", "data.image_size=32")
    assert dm.class_names == ["circle", "square", "triangle"]
    assert sum(len(dm.splits[s].labels) for s in ("train", "val", "test")) == 40
    x, targets = next(dm.batches("test", 4))
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and targets[0]["boxes"].shape[1] == 4
    images, batch_targets = next(iter(dm.loader("train", train=True)))
    assert images.shape[1:] == (3, 32, 32) and isinstance(batch_targets, list) and "labels" in batch_targets[0]
    assert dm.calibration().shape[1:] == (3, 32, 32)


def test_yolo_folder_converts_boxes_exactly(tmp_path):
    root = tmp_path / "yolo"
    for split in ("train", "val", "test"):
        image(root / "images" / split / "a.jpg")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.25\n0 0.25 0.75 0.5 0.5\n")
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "a.txt").write_text("")  # test/a.jpg has no label file: background only
    (root / "data.yaml").write_text("names: {0: cat, 1: dog}\n")
    dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32")
    assert dm.class_names == ["cat", "dog"]
    t = dm.splits["train"].labels[0]
    np.testing.assert_allclose(t["boxes"], [[8, 12, 24, 20], [0, 16, 16, 32]])
    assert t["labels"].tolist() == [1, 0]
    assert len(dm.splits["test"].labels[0]["boxes"]) == 0 and len(dm.splits["val"].labels[0]["boxes"]) == 0


def test_coco_json_converts_boxes_exactly(tmp_path):
    root = tmp_path / "coco"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        image(root / "img" / name, 100, 50)
    coco = {"images": [{"id": i, "file_name": n, "width": 100, "height": 50} for i, n in enumerate("abcd", 1)],
            "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 50, 20], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 1}]}
    for i, name in enumerate("abcd", 1):
        coco["images"][i - 1]["file_name"] = f"{name}.jpg"
    (root / "ann.json").write_text(json.dumps(coco))
    dm = det_data(tmp_path, "data=coco", f"data.root={root}", "data.options.annotations=ann.json",
                  "data.options.images=img", "data.image_size=20", "data.split.val=0.25", "data.split.test=0.25")
    assert dm.class_names == ["person", "car"]  # category id order
    everything = [t for s in ("train", "val", "test") for t in dm.splits[s].labels]
    with_box = [t for t in everything if len(t["boxes"])]
    assert len(everything) == 4 and len(with_box) == 1  # the crowd box is skipped
    np.testing.assert_allclose(with_box[0]["boxes"], [[2, 2, 12, 10]])
    assert with_box[0]["labels"].tolist() == [1]


def test_voc_xml_converts_boxes_exactly(tmp_path):
    root = tmp_path / "voc"
    for name in ("a", "b", "c"):
        image(root / "JPEGImages" / f"{name}.jpg", 40, 40)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>40</width><height>40</height></size>"
            "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>11</ymin>"
            "<xmax>20</xmax><ymax>40</ymax></bndbox></object>"
            "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
            "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, name in (("train", "a"), ("val", "b"), ("test", "c")):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(name + "\n")
    dm = det_data(tmp_path, "data=voc", f"data.root={root}", "data.image_size=40")
    assert dm.class_names == ["cat", "dog"]
    t = dm.splits["test"].labels[0]
    np.testing.assert_allclose(t["boxes"], [[0, 10, 20, 40]])  # 1-based inclusive corners; difficult skipped
    assert t["labels"].tolist() == [1]


@pytest.mark.parametrize("line, message", [
    ("7 0.5 0.5 0.2 0.2", "class id 7 is not below the number of classes (2"),
    ("0 0.5 0.5 1.8 0.2", "lies outside the image"),
    ("0 0.5 0.5 0.0 0.2", "has zero area"),
    ("0 0.5 0.5", "expected 'class cx cy w h'"),
])
def test_bad_yolo_label_names_the_file_and_line(tmp_path, line, message):
    root = tmp_path / "bad"
    image(root / "images" / "train" / "a.jpg")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(line + "\n")
    with pytest.raises(EdgebuildError) as e:
        det_data(tmp_path, "data=yolo", f"data.root={root}", "data.options.names=[a,b]")
    assert message in e.value.what and "a.txt:1" in e.value.what


def test_annotation_naming_a_missing_image_is_refused(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gone.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "x"}], "annotations": []}))
    with pytest.raises(EdgebuildError, match="gone.jpg"):
        det_data(tmp_path, "data=coco", f"data.root={root}")
    (root / "labels").mkdir()
    image(root / "images" / "b.jpg")
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(EdgebuildError, match="orphan.txt has no image"):
        det_data(tmp_path, "data=yolo", f"data.root={root}")


def test_classification_data_is_unchanged_by_the_detection_task(tmp_path):
    """Golden: the synthetic classification splits (pixels and labels) as they were before detection existed."""
    dm = DataModule(testing.compose(testing.shrink(tmp_path) + ["data=synthetic"]).data, tmp_path)
    h = hashlib.sha256()
    for s in ("train", "val", "test"):
        h.update(dm.splits[s].images.tobytes())
        h.update(dm.splits[s].labels.tobytes())
    assert h.hexdigest() == "762f123471f1c35a73ef1c65fc463b26e5900a3d6e78a6f15084e8945f857a03"
