"""dcdit.evaluation.images: input checks, folder and .npz reading, labels and settings next to the samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dcdit.evaluation import images as I
from dcdit.sampling import write_npz


def test_check_samples_rejects_nan_float_and_bad_shapes():
    x = np.zeros((4, 8, 8, 3), dtype=np.float32)
    x[1, 2, 3, 0] = np.nan
    x[2, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf values in 2 of 4 images"):
        I.check_samples(x)
    with pytest.raises(ValueError, match="must be uint8.*to_uint8_images"):
        I.check_samples(np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        I.check_samples(np.zeros((4, 8, 8, 3), dtype=np.int16))
    with pytest.raises(ValueError, match="shape"):
        I.check_samples(np.zeros((4, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        I.check_samples(np.zeros((0, 8, 8, 3), dtype=np.uint8))
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    rgb = I.check_samples(gray)
    assert rgb.shape == (2, 4, 4, 3) and (rgb == gray[..., None]).all()


def test_npz_and_folder_read_identically(tmp_path, ev):
    u8 = np.random.default_rng(1).integers(0, 256, size=(7, 12, 10, 3), dtype=np.uint8)
    ev.write_folder(u8, tmp_path / "images")
    write_npz(u8, tmp_path / "samples.npz")
    a, b = I.load_images(tmp_path / "images"), I.load_images(tmp_path / "samples.npz")
    assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, u8) and np.array_equal(b, u8)
    assert np.array_equal(I.load_images(tmp_path / "images", max_images=3), u8[:3])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        I.load_images(tmp_path / "nope.npz")


def test_labels_are_looked_up_in_order(tmp_path):
    """--labels first, then arr_1 of the .npz, then settings.json's labels (one per image); else a reason."""
    u8 = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    write_npz(u8, tmp_path / "with.npz", labels=np.array([3, 1, 4, 1]))
    write_npz(u8, tmp_path / "without.npz")
    (tmp_path / "l.json").write_text(json.dumps({"labels": [9, 8, 7, 6, 5]}))
    y, src = I.load_labels(tmp_path / "with.npz", 4, labels_path=tmp_path / "l.json")
    assert y.tolist() == [9, 8, 7, 6] and src == str(tmp_path / "l.json")
    y, src = I.load_labels(tmp_path / "with.npz", 4, settings={"labels": [0, 0, 0, 0]})
    assert y.tolist() == [3, 1, 4, 1] and src.endswith("with.npz:arr_1")
    y, src = I.load_labels(tmp_path / "without.npz", 4, settings={"labels": [0, 1, 2, 3]})
    assert y.tolist() == [0, 1, 2, 3] and src == "settings.json:labels"
    y, src = I.load_labels(tmp_path / "without.npz", 4, settings={"labels": [0, 1]})  # not one per image
    assert y is None and "no labels" in src
    np.save(tmp_path / "f.npy", np.array([1.0, 2.0, 2.5, 0.0]))
    with pytest.raises(ValueError, match="integers"):
        I.load_labels(None, 4, labels_path=tmp_path / "f.npy")


def test_settings_are_found_next_to_or_above_the_samples(tmp_path):
    """`dcdit sample-ddp` writes settings.json next to samples.npz and one level above images/."""
    (tmp_path / "run" / "images").mkdir(parents=True)
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"seed": 3}))
    for p in (tmp_path / "run" / "images", tmp_path / "run" / "samples.npz"):
        settings, path = I.find_settings(p)
        assert settings == {"seed": 3} and path == str(tmp_path / "run" / "settings.json")
    assert I.find_settings(tmp_path / "elsewhere" / "x.npz") == (None, None)
    (tmp_path / "run" / "settings.json").write_text("{not json")
    with pytest.raises(ValueError, match="settings.json is not valid JSON"):
        I.find_settings(tmp_path / "run" / "images")


def test_constant_images_are_warned_about_and_mnist_detected():
    u8 = np.random.default_rng(2).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    u8[1] = 0  # what a NaN sample looks like after a uint8 cast
    assert I.sample_warnings(u8) == ["1 of 5 images are a single constant colour (NaN samples cast to uint8 look like this)"]
    assert not I.looks_like_mnist(u8)
    assert I.looks_like_mnist(np.repeat(u8[..., :1], 3, -1)) and not I.looks_like_mnist(u8[:, :28, :28])
