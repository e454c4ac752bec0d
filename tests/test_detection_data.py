"""Detection data: the shapes generator, YOLO / COCO / VOC loaders on hand-written fixtures (boxes
converted exactly), bad annotations (one clear message naming the file), classification data unchanged."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from edgebuild import summary as summaries
from edgebuild import testing
from edgebuild.data import DataModule
from edgebuild.detection.data import DetectionDataModule, generate_shapes
from edgebuild.errors import EdgebuildError
from tests.conftest import run_cli


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


def test_classification_data_is_unchanged_by_the_detection_task(tmp_path):
    """Golden: the synthetic classification splits (pixels and labels) as they were before detection existed."""
    dm = DataModule(testing.compose(testing.shrink(tmp_path) + ["data=synthetic"]).data, tmp_path)
    h = hashlib.sha256()
    for s in ("train", "val", "test"):
        h.update(dm.splits[s].images.tobytes())
        h.update(dm.splits[s].labels.tobytes())
    assert h.hexdigest() == "762f123471f1c35a73ef1c65fc463b26e5900a3d6e78a6f15084e8945f857a03"


# ----------------------------------------------------------------------------- YOLO data.yaml layouts
def yolo_split(root, folder, names, label="0 0.5 0.5 0.5 0.5\n", shade=0):
    """Images root/images/FOLDER/NAME.png (each a distinct colour, so they can be told apart after
    decoding) with labels root/labels/FOLDER/NAME.txt."""
    for i, name in enumerate(names):
        path = root / "images" / folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (shade, 10 * i, 100)).save(path)
        if label is not None:
            (root / "labels" / folder).mkdir(parents=True, exist_ok=True)
            (root / "labels" / folder / f"{name}.txt").write_text(label)


def colours(dm, split):
    return {tuple(int(v) for v in x[:, 0, 0]) for x in dm.splits[split].images}


def coco_like(tmp_path, yaml_text):
    root = tmp_path / "coco_like"
    yolo_split(root, "train2017", [f"t{i}" for i in range(8)], shade=10)
    yolo_split(root, "val2017", [f"v{i}" for i in range(3)], shade=200)
    (root / "data.yaml").write_text(yaml_text)
    return root


def test_yaml_splits_decide_no_val_image_is_trained_on(tmp_path):
    root = coco_like(tmp_path, "path: .\ntrain: images/train2017\nval: images/val2017\nnames: [thing]\n")
    dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32")
    val, train = colours(dm, "val"), colours(dm, "train") | colours(dm, "val") and colours(dm, "train")
    assert len(dm.splits["val"].labels) == 3 and all(c[0] == 200 for c in val)  # exactly the val2017 images
    assert not val & train and all(c[0] == 10 for c in train)
    # no test: in the yaml -> val serves as test; train is not cut down by the seed
    assert len(dm.splits["train"].labels) + len(dm.splits["test"].labels) == 8 + 3
    assert colours(dm, "test") == val
    origins = dm.split_origins()
    assert origins["train"] == "data.yaml train: images/train2017 (8 images)"
    assert origins["val"] == "data.yaml val: images/val2017 (3 images)"
    assert origins["test"].startswith("data.yaml val: images/val2017") and "3 images" in origins["test"]


def test_yaml_with_only_train_splits_val_and_test_from_it_by_seed(tmp_path):
    root = coco_like(tmp_path, "train: images/train2017\n")
    dm = det_data(tmp_path, "data=yolo", f"data.root={root / 'data.yaml'}", "data.image_size=32",
                  "data.split.val=0.25", "data.split.test=0.25", "data.options.names=[thing]")
    counts = {s: len(dm.splits[s].labels) for s in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}  # the val2017 folder is not in the yaml: unused
    assert all(c[0] == 10 for s in ("train", "val", "test") for c in colours(dm, s))
    origins = dm.split_origins()
    assert origins["val"] == "split from train by seed 0 (2 images)"
    assert origins["test"] == "split from train by seed 0 (2 images)"
    assert origins["train"].startswith("data.yaml train: images/train2017") and "(4 images)" in origins["train"]


def test_yaml_list_of_folders_and_txt_of_image_paths(tmp_path):
    root = tmp_path / "mixed"
    yolo_split(root, "a", ["a0", "a1"], shade=10)
    yolo_split(root, "b", ["b0"], shade=20)
    yolo_split(root, "v", ["v0", "v1", "v2"], shade=200)
    yolo_split(root, "t", ["t0"], shade=250)
    (root / "val.txt").write_text("images/v/v0.png\n./images/v/v2.png\n\n")  # v1 is not listed
    (root / "data.yaml").write_text(f"path: {root}\ntrain: [images/a, images/b]\nval: val.txt\ntest: images/t\n")
    dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32")
    assert {c[0] for c in colours(dm, "train")} == {10, 20} and len(dm.splits["train"].labels) == 3
    assert len(dm.splits["val"].labels) == 2 and {c[1] for c in colours(dm, "val")} == {0, 20}
    assert colours(dm, "test") == {(250, 0, 100)}
    np.testing.assert_allclose(dm.splits["val"].labels[0]["boxes"], [[8, 8, 24, 24]])  # labels/v/v0.txt found
    assert dm.split_origins()["train"] == "data.yaml train: [images/a, images/b] (3 images)"


def test_labels_beside_images_when_the_path_has_no_images_folder(tmp_path):
    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (0, i, 0)).save(root / split / f"{i}.png")
            (root / split / f"{i}.txt").write_text("0 0.25 0.25 0.5 0.5\n")
    (root / "data.yaml").write_text("train: train\nval: val\nnames: {0: a}\n")
    dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32")
    np.testing.assert_allclose(dm.splits["val"].labels[0]["boxes"], [[0, 0, 16, 16]])


@pytest.mark.parametrize("yaml_text, key, shown", [
    ("train: images/train2017\nval: images/nope\n", "val:", "images/nope"),
    ("train: [images/train2017, images/gone]\nval: images/val2017\n", "train:", "images/gone"),
    ("train: images/train2017\nval: images/val2017\ntest: missing.txt\n", "test:", "missing.txt"),
    ("path: ../elsewhere\ntrain: images/train2017\n", "path:", "../elsewhere"),
])
def test_missing_split_path_names_the_key_and_the_path(tmp_path, yaml_text, key, shown):
    root = coco_like(tmp_path, yaml_text)
    with pytest.raises(EdgebuildError) as e:
        det_data(tmp_path, "data=yolo", f"data.root={root}")
    assert f"data.yaml: {key} {shown} does not exist" in e.value.what and "fix" in e.value.fix


def test_txt_list_naming_a_missing_image_is_refused(tmp_path):
    root = coco_like(tmp_path, "train: images/train2017\nval: val.txt\n")
    (root / "val.txt").write_text("images/val2017/v0.png\nimages/val2017/zz.png\n")
    with pytest.raises(EdgebuildError, match=r"val.txt:2 names image images/val2017/zz.png"):
        det_data(tmp_path, "data=yolo", f"data.root={root}")


@pytest.mark.parametrize("layout", ["yaml", "folders"])
def test_stray_labels_warn_and_go_on_strict_makes_them_an_error(tmp_path, caplog, layout):
    root = tmp_path / layout
    yolo_split(root, "train", ["a", "b", "c"])
    yolo_split(root, "val", ["v"])
    yolo_split(root, "test", ["t"])
    (root / "labels" / "train" / "orphan1.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "val" / "orphan2.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "train" / "b.txt").unlink()  # an image without labels: background
    if layout == "yaml":
        (root / "data.yaml").write_text("train: images/train\nval: images/val\ntest: images/test\nnames: [x]\n")
    with caplog.at_level("WARNING"):
        dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32")
    text = caplog.text
    assert "2 label file(s) have no image" in text and "orphan1.txt" in text and "orphan2.txt" in text
    assert "1 of 5 images have no label file" in text and "b.png" in text
    assert sum(len(t["boxes"]) == 0 for t in dm.splits["train"].labels) == 1
    with pytest.raises(EdgebuildError, match="has no image") as e:
        det_data(tmp_path, "data=yolo", f"data.root={root}", "data.options.strict=true")
    assert "orphan1.txt" in e.value.what and "2 label file(s)" in e.value.what
    with pytest.raises(EdgebuildError, match="must be a bool"):
        det_data(tmp_path, "data=yolo", f"data.root={root}", "data.options.strict=sometimes")


def test_strict_does_not_change_the_data_fingerprint(tmp_path):
    root = coco_like(tmp_path, "train: images/train2017\nval: images/val2017\n")
    a = det_data(tmp_path, "data=yolo", f"data.root={root}")
    b = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.options.strict=true")
    assert a.fingerprint == b.fingerprint


def test_legacy_folders_keep_their_splits_and_say_where_they_came_from(tmp_path):
    root = tmp_path / "legacy"
    yolo_split(root, "train", [f"t{i}" for i in range(6)])
    yolo_split(root, "val", ["v0", "v1"], shade=200)
    dm = det_data(tmp_path, "data=yolo", f"data.root={root}", "data.image_size=32", "data.options.names=[x]")
    origins = dm.split_origins()
    assert origins["test"] == f"folder {root / 'images' / 'val'} (2 images)"  # a missing test split: from val
    assert origins["val"].startswith("split from train by seed 0 (") and "train" in origins["train"]


def test_renaming_classes_in_the_yaml_changes_the_fingerprint_of_the_old_layout(tmp_path):
    """images/ + labels/ with a yaml that only names the classes: the names are part of the data (a cached
    model would otherwise keep the old names), even when the rename keeps the yaml's size and mtime."""
    import os

    root = tmp_path / "legacy"
    yolo_split(root, "train", ["t0", "t1"])
    yolo_split(root, "val", ["v0"], shade=200)
    (root / "data.yaml").write_text("names: [cat]\n")
    cat = det_data(tmp_path, "data=yolo", f"data.root={root}")
    stat = (root / "data.yaml").stat()
    (root / "data.yaml").write_text("names: [dog]\n")
    os.utime(root / "data.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dog = det_data(tmp_path, "data=yolo", f"data.root={root}")
    assert (cat.class_names, dog.class_names) == (["cat"], ["dog"])
    assert cat.fingerprint != dog.fingerprint
    assert det_data(tmp_path, "data=yolo", f"data.root={root}").fingerprint == dog.fingerprint  # stable


def test_summary_has_the_data_section(tmp_path):
    summary = {"recipe": "r", "target": "cpu", "stages": [], "budget": {"checks": [], "ok": True},
               "data": {"train": "data.yaml train: images/train2017 (8 images)"}}
    summaries.write(summary, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["data"] == summary["data"]
    assert "| train | data.yaml train: images/train2017 (8 images) |" in (tmp_path / "summary.md").read_text()


def test_build_summary_says_where_each_split_came_from(tmp_path):
    root = coco_like(tmp_path, "train: images/train2017\nval: images/val2017\nnames: [thing]\n")
    s = testing.build(testing.shrink(tmp_path) + [
        "data=yolo", f"data.root={root}", "data.image_size=32", "model.kwargs.width=8", "stages.train.epochs=1",
        "stages.quantize=null", "budget.min_map=null", "budget.max_map_drop=null", "data.batch_size=4"],
        tmp_path, recipe="ssd_int8")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["data"]["val"] == "data.yaml val: images/val2017 (3 images)" == s["data"]["val"]
    assert "data.yaml train: images/train2017 (8 images)" in (tmp_path / "run" / "summary.md").read_text()


def test_cli_missing_split_path_exits_2_without_traceback(tmp_path):
    root = coco_like(tmp_path, "train: images/train2017\nval: images/val2018\n")
    r = run_cli(["recipe=ssd_int8", "data=yolo", f"data.root={root}", *testing.shrink(tmp_path)], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "val: images/val2018 does not exist" in out
