"""Data sets: the embedded digits set and readers for CIFAR-10 and MNIST files on disk.

* **digits** — scikit-learn's bundled 8x8 handwritten digits (1797 real images, values 0..16),
  needs no download; scaled to [0, 1] and split with a fixed, seeded, stratified split.
* **CIFAR-10** — the official python version (``cifar-10-batches-py/``: ``data_batch_1..5`` and
  ``test_batch``, each a pickled dict with ``b"data"`` uint8 [n, 3072] in channel-first planes
  R, G, B of 32x32, and ``b"labels"``) or the binary version (``cifar-10-batches-bin/``:
  ``data_batch_1..5.bin``, ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes).
  Pickles are read with a restricted unpickler: the official files store ``b"data"`` as a
  numpy array, so exactly the globals numpy needs to rebuild an array (``_reconstruct``,
  ``ndarray``, ``dtype``) are allowed and every other global is refused, so a tampered file
  cannot run code.
* **MNIST** — IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``,
  optionally gzipped). Header: 2 zero bytes, a type byte (0x08 = uint8), a rank byte, then one
  big-endian uint32 per dimension.

All images come back as float32 in [0, 1], channel first; labels as int64.
"""
from __future__ import annotations

import functools
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetInfo", "DIGITS", "CIFAR10_INFO", "MNIST_INFO", "load_digits_split",
           "embedded_digits", "CIFAR10", "MNIST"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set: name, input shape (C, H, W) and number of classes."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int


DIGITS = DatasetInfo("digits", (1, 8, 8), 10)
CIFAR10_INFO = DatasetInfo("cifar10", (3, 32, 32), 10)
MNIST_INFO = DatasetInfo("mnist", (1, 28, 28), 10)


# ----------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=16)
def _digits_split(seed: int, test_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                          random_state=seed)
    return (torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr),
            torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte))


def load_digits_split(seed: int = 0, test_fraction: float = 0.25
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``x_train, y_train, x_test, y_test`` of the sklearn digits set.

    Images are float32 [N, 1, 8, 8] in [0, 1], labels int64; the split is stratified and
    fixed by ``seed``. Results are cached; the returned tensors are fresh clones.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return tuple(t.clone() for t in _digits_split(int(seed), float(test_fraction)))  # type: ignore[return-value]


def embedded_digits(split: str = "train", seed: int = 0) -> TensorDataset:
    """The digits ``split`` ("train" or "test") as a ``TensorDataset`` of (image, label)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xtr, ytr, xte, yte = load_digits_split(seed)
    return TensorDataset(xtr, ytr) if split == "train" else TensorDataset(xte, yte)


# ----------------------------------------------------------------------------------- CIFAR-10
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array reconstruction (needed by the
    official batches, same allowlist as ``torch.load(weights_only=True)``)."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name} in {self._source}: CIFAR-10 batches contain only "
            "plain dicts, lists, bytes and numpy arrays")


def _safe_unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, str(path)).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


_CIFAR_PIXELS = 3 * 32 * 32


class CIFAR10(Dataset):
    """CIFAR-10 from the official python-pickle or binary batches under ``root``.

    ``root`` may contain ``cifar-10-batches-py/`` or ``cifar-10-batches-bin/``, or be one of
    those directories. ``data`` is float32 [N, 3, 32, 32] in [0, 1]; ``targets`` int64 [N].
    """

    info = CIFAR10_INFO

    def __init__(self, root: str | Path, train: bool = True) -> None:
        self.root = Path(root)
        self.train = bool(train)
        stems = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        kind, folder = self._locate(stems)
        xs, ys = [], []
        for stem in stems:
            x, y = (self._read_py(folder / stem) if kind == "py"
                    else self._read_bin(folder / f"{stem}.bin"))
            xs.append(x)
            ys.append(y)
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)
        self.data = torch.from_numpy(x.astype(np.float32) / 255.0)
        self.targets = torch.from_numpy(np.concatenate(ys).astype(np.int64))

    def _locate(self, stems: list[str]) -> tuple[str, Path]:
        candidates = [("py", self.root / "cifar-10-batches-py", ""),
                      ("bin", self.root / "cifar-10-batches-bin", ".bin"),
                      ("py", self.root, ""), ("bin", self.root, ".bin")]
        for kind, folder, ext in candidates:
            if all((folder / f"{s}{ext}").is_file() for s in stems):
                return kind, folder
        raise FileNotFoundError(
            f"CIFAR-10 {'train' if self.train else 'test'} batches not found under {self.root}: "
            f"expected {', '.join(stems)} in cifar-10-batches-py/ (python version) or "
            f"{', '.join(s + '.bin' for s in stems)} in cifar-10-batches-bin/ (binary version)")

    @staticmethod
    def _read_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
        d = _safe_unpickle(path)
        if b"data" not in d or b"labels" not in d:
            raise ValueError(f"{path}: missing b'data' or b'labels' key")
        raw = d[b"data"]
        if isinstance(raw, (bytes, bytearray)):
            raw = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_PIXELS) \
                if len(raw) % _CIFAR_PIXELS == 0 else np.frombuffer(raw, np.uint8)[None]
        if not isinstance(raw, (np.ndarray, list)) or getattr(raw, "dtype", np.uint8) == object:
            raise ValueError(f"{path}: b'data' must be a uint8 array, got {type(raw).__name__}")
        x = np.asarray(raw, dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != _CIFAR_PIXELS or x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: expected data [n, {_CIFAR_PIXELS}] and n labels, "
                             f"got data {tuple(x.shape)} and {y.shape[0]} labels")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{path}: labels outside 0..9")
        return x, y

    @staticmethod
    def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
        raw = np.fromfile(path, dtype=np.uint8)
        rec = 1 + _CIFAR_PIXELS
        if raw.size % rec:
            raise ValueError(f"{path}: size {raw.size} is not a multiple of the {rec}-byte record")
        raw = raw.reshape(-1, rec)
        y = raw[:, 0].astype(np.int64)
        if y.size and y.max() > 9:
            raise ValueError(f"{path}: labels outside 0..9")
        return raw[:, 1:], y

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]


# ----------------------------------------------------------------------------------- MNIST
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of uint8 with the expected ``magic`` (rank in the low byte)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    got = int.from_bytes(buf[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic 0x{got:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    if len(buf) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    n = int(np.prod(dims))
    body = len(buf) - 4 - 4 * ndim
    if body != n:
        raise ValueError(f"{path}: header dims {dims} need {n} bytes, file holds {body}")
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MNIST(Dataset):
    """MNIST (or any same-format set, e.g. Fashion-MNIST) from IDX files under ``root``.

    Looks in ``root`` and ``root/MNIST/raw``, plain or ``.gz``. ``data`` is float32
    [N, 1, H, W] in [0, 1] with H, W from the header; ``targets`` int64 [N].
    """

    info = MNIST_INFO

    def __init__(self, root: str | Path, train: bool = True) -> None:
        self.root = Path(root)
        self.train = bool(train)
        prefix = "train" if train else "t10k"
        img = self._find(f"{prefix}-images-idx3-ubyte")
        lab = self._find(f"{prefix}-labels-idx1-ubyte")
        x = _read_idx(img, _IDX_IMAGES)
        y = _read_idx(lab, _IDX_LABELS)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{img} has {x.shape[0]} images but {lab} has {y.shape[0]} labels")
        self.data = torch.from_numpy(x.astype(np.float32)[:, None] / 255.0)
        self.targets = torch.from_numpy(y.astype(np.int64))

    def _find(self, name: str) -> Path:
        for folder in (self.root, self.root / "MNIST" / "raw"):
            for cand in (folder / name, folder / f"{name}.gz"):
                if cand.is_file():
                    return cand
        raise FileNotFoundError(f"MNIST file {name}[.gz] not found under {self.root} "
                                f"(also looked in {self.root / 'MNIST' / 'raw'})")

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]
