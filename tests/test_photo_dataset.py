"""Photo datasets for super-resolution (no Ray): a folder of PNG/JPEG files of any size becomes train/val shards of
lossless PNGs; the manifest records the smallest training image, which the SR plan checks against the patch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genai.data.photo_dataset import load_photo_manifest, load_photos, prepare_photo_dataset
from genai.data.shards import DatasetError


def photos(folder, sizes):
    rng = np.random.default_rng(0)
    folder.mkdir()
    images = {}
    for i, (h, w) in enumerate(sizes):
        images[f"p{i}.png"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(images[f"p{i}.png"]).save(folder / f"p{i}.png")
    return images


def test_a_folder_becomes_train_and_val_shards_that_read_back_exactly(tmp_path):
    images = photos(tmp_path / "in", [(40, 50), (64, 64), (30, 90), (50, 40)])
    (tmp_path / "in" / "notes.txt").write_text("skipped")
    m = prepare_photo_dataset(f"images:{tmp_path / 'in'}", str(tmp_path / "ds"), val_fraction=0.25,
                              log=lambda *_: None)
    assert m.channels == 3 and m.raw["splits"]["train"]["rows"] == 3 and m.raw["splits"]["val"]["rows"] == 1
    again = load_photo_manifest(str(tmp_path / "ds"))
    read = load_photos(again, "train") + load_photos(again, "val")
    assert sorted(a.tobytes() for a in read) == sorted(a.tobytes() for a in images.values())
    train_sides = [min(a.shape[:2]) for a in load_photos(again, "train")]
    assert min(m.min_train_image["height"], m.min_train_image["width"]) == min(train_sides)


def test_grey_preparation_and_a_broken_file_named(tmp_path):
    photos(tmp_path / "in", [(20, 20), (24, 24)])
    m = prepare_photo_dataset(f"images:{tmp_path / 'in'}", str(tmp_path / "grey"), channels=1, log=lambda *_: None)
    assert all(a.shape[2] == 1 for a in load_photos(m, "train"))
    (tmp_path / "in" / "p9.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match="p9.jpg: not a readable PNG or JPEG image"):
        prepare_photo_dataset(f"images:{tmp_path / 'in'}", str(tmp_path / "ds2"), log=lambda *_: None)
    assert not (tmp_path / "ds2").exists()
