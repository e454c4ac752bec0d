"""Data sources: deterministic splits, ImageFolder layouts (folder and .tar.gz), bad folders."""

import tarfile

import numpy as np
import pytest
from PIL import Image

from edgebuild import testing
from edgebuild.data import DataModule
from edgebuild.errors import EdgebuildError


def data_cfg(tmp_path, *overrides):
    return testing.compose(testing.shrink(tmp_path) + list(overrides)).data


def make_folder(root, classes=("cat", "dog"), per_class=12, split=None, size=12):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.uniform(0, 60, (size, size, 3)) + 150 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_digits_split_is_deterministic_and_complete(tmp_path):
    a = DataModule(data_cfg(tmp_path), tmp_path)
    b = DataModule(data_cfg(tmp_path), tmp_path)
    c = DataModule(data_cfg(tmp_path, "data.split.seed=1"), tmp_path)
    assert sum(len(a.splits[s].labels) for s in ("train", "val", "test")) == 1797
    assert np.array_equal(a.splits["test"].labels, b.splits["test"].labels)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not np.array_equal(a.splits["test"].images, c.splits["test"].images)


def test_imagefolder_plain_layout_is_split_by_seed(tmp_path):
    root = make_folder(tmp_path / "pets")
    dm = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={root}", "data.image_size=8"), tmp_path)
    assert dm.class_names == ["cat", "dog"]
    assert sum(len(dm.splits[s].labels) for s in ("train", "val", "test")) == 24
    assert dm.splits["train"].images.shape[1:] == (3, 8, 8)
    x, y = next(dm.batches("test", 4))
    assert x.dtype == np.float32 and x.shape == (4, 3, 8, 8)


def test_limit_is_taken_before_the_resize(tmp_path, monkeypatch):
    """A 224-pixel build on 1,000 of CIFAR's 50,000 images resizes 1,000, not 50,000 (7.5 GB)."""
    import edgebuild.data as data

    resized = []
    real = data._resize
    monkeypatch.setattr(data, "_resize", lambda images, *a: resized.append(len(images)) or real(images, *a))
    root = make_folder(tmp_path / "pets", per_class=20)
    dm = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={root}", "data.image_size=16",
                             "data.limit=10"), tmp_path)
    assert sum(len(dm.splits[s].labels) for s in ("train", "val", "test")) == 10
    assert dm.splits["train"].images.shape[1:] == (3, 16, 16) and sum(resized) == 10


def test_imagefolder_keeps_given_split_folders(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        make_folder(root, per_class=n, split=split)
    dm = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={root}"), tmp_path)
    assert [len(dm.splits[s].labels) for s in ("train", "val", "test")] == [20, 6, 8]


def test_imagefolder_reads_a_tar_gz_like_the_cifar_archive(tmp_path, monkeypatch):
    make_folder(tmp_path / "src" / "cifar-like", split="train")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-like", arcname="cifar-like")
    dm = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={archive}"), tmp_path)
    assert dm.class_names == ["cat", "dog"]
    assert sum(len(dm.splits[s].labels) for s in ("train", "val", "test")) == 24
    (listing,) = (tmp_path / "data" / "listings").glob("*.json")
    # a rebuild takes the member list and the images from the cache: the archive is never decompressed
    with monkeypatch.context() as m:
        m.setattr(tarfile.TarFile, "getmembers", lambda self: pytest.fail("the archive was listed again"))
        again = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={archive}"), tmp_path)
    assert np.array_equal(again.splits["train"].images, dm.splits["train"].images)
    # a new image size decodes again, from the listed names
    other = tmp_path / "other"
    (other / "data" / "listings").mkdir(parents=True)
    (other / "data" / "listings" / listing.name).write_text(listing.read_text())
    small = DataModule(data_cfg(other, "data=imagefolder", f"data.root={archive}", "data.image_size=4"), other)
    assert small.splits["train"].images.shape[2:] == (4, 4) and small.class_names == ["cat", "dog"]


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty_class", "bird under .* hold no images"),
    ("no_images", "no images found"),
])
def test_bad_folders_are_named(tmp_path, case, match):
    root = tmp_path / "ds"
    if case != "missing":
        root.mkdir()
    if case == "empty_class":
        make_folder(root)
        (root / "bird").mkdir()
    if case == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(EdgebuildError, match=match):
        DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={root}"), tmp_path)


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    dm = DataModule(data_cfg(tmp_path, "data=imagefolder", f"data.root={root}"), tmp_path)
    with pytest.raises(EdgebuildError, match="cannot read image .*broken.jpg"):
        _ = dm.splits


def test_calibration_subset_is_seeded_and_clamped(tmp_path, caplog):
    dm = DataModule(data_cfg(tmp_path, "data.calibration.size=50"), tmp_path)
    assert dm.calibration().shape == (50, 1, 8, 8)
    assert np.array_equal(dm.calibration(), dm.calibration())
    big = DataModule(data_cfg(tmp_path, "data.calibration.size=100000"), tmp_path)
    assert len(big.calibration()) == len(big.splits["train"].labels)
    assert "using all" in caplog.text
