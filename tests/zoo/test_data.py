"""Tests for robcomp.zoo.data: digits split, CIFAR-10 (pickle + binary) and MNIST (IDX) readers."""
from __future__ import annotations

import collections
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from robcomp.zoo.data import CIFAR10, DIGITS, MNIST, embedded_digits, load_digits_split


# ------------------------------------------------------------------ digits
def test_digits_split_sizes_and_range():
    xtr, ytr, xte, yte = load_digits_split()
    assert xtr.shape[0] + xte.shape[0] == 1797
    assert xtr.shape[1:] == DIGITS.input_shape and xtr.dtype == torch.float32
    assert ytr.dtype == torch.int64 and ytr.shape[0] == xtr.shape[0]
    for x in (xtr, xte):
        assert x.min() >= 0 and x.max() <= 1
    assert abs(xte.shape[0] / 1797 - 0.25) < 0.01


def test_digits_stratified():
    _, ytr, _, yte = load_digits_split()
    ptr = torch.bincount(ytr, minlength=10).double() / len(ytr)
    pte = torch.bincount(yte, minlength=10).double() / len(yte)
    assert (ptr - pte).abs().max() < 0.01


def test_digits_seed_and_cache_isolation():
    a = load_digits_split(seed=0)
    b = load_digits_split(seed=0)
    c = load_digits_split(seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    a[0].zero_()  # mutating a result must not poison the cache
    assert torch.equal(load_digits_split(seed=0)[0], b[0])


def test_embedded_digits():
    tr, te = embedded_digits("train"), embedded_digits("test")
    assert len(tr) + len(te) == 1797
    x, y = tr[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="split"):
        embedded_digits("val")


# ------------------------------------------------------------------ CIFAR-10
def _fake_cifar(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _write_cifar_py(folder, rng, n=5, as_bytes=False):
    """Official layout: b"data" is a numpy uint8 array (or raw bytes when ``as_bytes``)."""
    folder.mkdir(parents=True)
    out = {}
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _fake_cifar(rng, n)
        with open(folder / stem, "wb") as f:
            pickle.dump({b"batch_label": stem.encode(), b"data": x.tobytes() if as_bytes else x,
                         b"labels": y,
                         b"filenames": [b"f.png"] * n}, f)
        out[stem] = (x, y)
    return out


def _check_cifar(ds, batches, stems):
    x = np.concatenate([batches[s][0] for s in stems])
    y = sum((list(batches[s][1]) for s in stems), [])
    assert len(ds) == len(y) and ds.data.shape == (len(y), 3, 32, 32)
    assert ds.data.dtype == torch.float32 and ds.targets.dtype == torch.int64
    assert ds.targets.tolist() == y
    expect = torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(ds.data, expect)
    # channel-first planes: byte 1024 + 32*r + c is green at (r, c)
    assert ds[0][0][1, 2, 3].item() == pytest.approx(x[0, 1024 + 32 * 2 + 3] / 255)
    assert ds[0][1].item() == y[0]


@pytest.mark.parametrize("inner,as_bytes", [(True, False), (False, False), (False, True)])
def test_cifar10_pickle(tmp_path, inner, as_bytes):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar_py(folder, rng, as_bytes=as_bytes)
    root = folder if inner else tmp_path
    _check_cifar(CIFAR10(root, train=True), batches, [f"data_batch_{i}" for i in range(1, 6)])
    _check_cifar(CIFAR10(root, train=False), batches, ["test_batch"])


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = {}
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _fake_cifar(rng, 4)
        rec = np.concatenate([np.asarray(y, np.uint8)[:, None], x], axis=1)
        (folder / f"{stem}.bin").write_bytes(rec.tobytes())
        batches[stem] = (x, y)
    _check_cifar(CIFAR10(tmp_path, train=True), batches, [f"data_batch_{i}" for i in range(1, 6)])
    _check_cifar(CIFAR10(folder, train=False), batches, ["test_batch"])
    (folder / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="multiple"):
        CIFAR10(tmp_path, train=False)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload", [collections.OrderedDict(a=1), _Evil(),
                                     np.array([_Evil()], dtype=object)])
def test_cifar10_refuses_globals(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder, np.random.default_rng(2))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": payload, b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="test_batch"):
        CIFAR10(tmp_path, train=False)


def test_cifar10_bad_shape(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        CIFAR10(tmp_path, train=False)


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFAR10(tmp_path / "nope", train=True)


# ------------------------------------------------------------------ MNIST
def _idx(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(3)
    files = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        x = rng.integers(0, 256, size=(n, 5, 6), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, blob in ((f"{prefix}-images-idx3-ubyte", _idx(x, 0x803)),
                           (f"{prefix}-labels-idx1-ubyte", _idx(y, 0x801))):
            if gz:
                (tmp_path / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (tmp_path / name).write_bytes(blob)
        files[prefix] = (x, y)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = MNIST(tmp_path, train=train)
        x, y = files[prefix]
        assert ds.data.shape == (len(y), 1, 5, 6) and ds.data.dtype == torch.float32
        assert torch.equal(ds.data, torch.from_numpy(x[:, None].astype(np.float32) / 255))
        assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == y.tolist()
        assert len(ds) == len(y) and ds[1][1].item() == y[1]


def test_mnist_errors(tmp_path):
    x = np.zeros((2, 3, 3), np.uint8)
    y = np.zeros(2, np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(x, 0x801))  # wrong magic
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(y, 0x801))
    with pytest.raises(ValueError, match="magic"):
        MNIST(tmp_path, train=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(x, 0x803)[:-1])  # truncated
    with pytest.raises(ValueError, match="bytes"):
        MNIST(tmp_path, train=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 3, 3), np.uint8), 0x803))
    with pytest.raises(ValueError, match="labels"):
        MNIST(tmp_path, train=False)
    with pytest.raises(FileNotFoundError, match="train-images"):
        MNIST(tmp_path, train=True)
