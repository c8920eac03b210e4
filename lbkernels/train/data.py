"""Data sets of the training command and the batches it trains on.

Every data set is held in memory as tensors (CIFAR: 150 MB of uint8 pixels) and moved
to the training device once; a batch is an index into them. Augmentation runs on whole
batches with tensor ops on that device, with its random numbers drawn on the CPU from
one seeded generator for the whole global batch, so a run is reproducible on any device
and K processes see exactly the data one process would.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lbkernels.data import ScheduledBatchSampler, split_evenly


class DataError(RuntimeError):
    """A data file is missing or is not what it should be."""


@dataclass
class Dataset:
    name: str
    train_inputs: torch.Tensor  # (N, C, H, W): uint8 pixels, or float features (digits)
    train_labels: torch.Tensor  # (N,) int64
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    # Per-channel statistics of pixels scaled to [0, 1]; None when inputs are floats
    # already standardised.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # Samples per epoch when it exceeds the stored ones (synthetic data repeats a pool).
    virtual_train_size: int | None = None

    @property
    def train_size(self) -> int:
        return self.virtual_train_size or len(self.train_labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_inputs.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.train_inputs.dtype == torch.uint8

    def to(self, device: torch.device) -> Dataset:
        for field in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
            setattr(self, field, getattr(self, field).to(device))
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs (float32) from stored inputs."""
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def train_sample(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices % len(self.train_labels)
        return self.train_inputs[indices], self.train_labels[indices]


# -- the data sets ------------------------------------------------------------------------
def load_digits(args) -> Dataset:
    """scikit-learn's 1,797 8x8 digits: a fixed stratified 80/20 split, every pixel
    standardised with the training statistics."""
    # Imported by the one data set that needs it: scikit-learn takes seconds to import
    # (5.2 s for sklearn.model_selection after torch, on a loaded 2-core machine).
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # border pixels that are blank in every training image

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32).view(-1, 1, 8, 8)

    return Dataset("digits", tensor(x_train), torch.tensor(y_train), tensor(x_test), torch.tensor(y_test), 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing
    else: a pickle can run arbitrary code, and a data directory is not trusted code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _read_cifar_tarball(path: Path, members: dict[str, list[str]], label_key: bytes,
                        num_classes: int, expect: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Split name -> (uint8 images (N, 3, 32, 32), int64 labels) from a python-version
    CIFAR tarball; ``members`` maps each split to the batch files (base names) it joins."""
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {expect} (pass its directory with --data-dir)")
    found: dict[str, dict] = {}
    wanted = {name for names in members.values() for name in names}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in wanted:
                    raw = tar.extractfile(info).read()
                    found[base] = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); expected {expect}") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} inside; expected {expect}")
    out = {}
    for split, names in members.items():
        images, labels = [], []
        for name in names:
            batch = found[name]
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                lab = np.asarray(batch[label_key], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: {name} lacks usable b'data' and {label_key!r} ({e}); "
                                f"expected {expect}") from None
            if data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (data.shape[0],):
                raise DataError(f"{path}: {name} holds data of shape {data.shape} and {lab.shape} "
                                f"labels; expected (N, 3072) pixels and N labels")
            if lab.size and not (0 <= lab.min() and lab.max() < num_classes):
                raise DataError(f"{path}: {name} has labels outside 0..{num_classes - 1}")
            images.append(data)
            labels.append(lab)
        x = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)
        out[split] = (x, torch.from_numpy(np.concatenate(labels)))
    return out


def load_cifar10(args) -> Dataset:
    splits = _read_cifar_tarball(
        Path(args.data_dir) / "cifar-10-python.tar.gz",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels", 10, "the CIFAR-10 python tarball (data_batch_1..5 and test_batch)",
    )
    return Dataset("cifar10", *splits["train"], *splits["test"], 10,
                   mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def load_cifar100(args) -> Dataset:
    splits = _read_cifar_tarball(
        Path(args.data_dir) / "cifar-100-python.tar.gz",
        {"train": ["train"], "test": ["test"]},
        b"fine_labels", 100, "the CIFAR-100 python tarball (train and test)",
    )
    return Dataset("cifar100", *splits["train"], *splits["test"], 100,
                   mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))


def load_synthetic(args) -> Dataset:
    """Random images and labels for throughput runs: a pool of up to 1,024 stored images
    serves any number of samples per epoch, so memory does not grow with the size."""
    g = torch.Generator().manual_seed(args.seed)
    side = args.image_size

    def pool(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (n,), generator=g))

    train, test = pool(min(args.synthetic_samples, 1024)), pool(1024)
    return Dataset("synthetic", *train, *test, 10, mean=(0.5,) * 3, std=(0.25,) * 3,
                   virtual_train_size=args.synthetic_samples)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "synthetic": load_synthetic,
}


# -- augmentation ---------------------------------------------------------------------------
def random_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                     pad: int = 4) -> torch.Tensor:
    """Crop each image of ``x`` (N, C, H, W) at offset (dy, dx) of its zero-padded copy,
    then mirror those with ``flip``."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    # Advanced indices around a slice put their dimensions first: (N, H, W, C).
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, side: int) -> torch.Tensor:
    """Zero a ``side`` x ``side`` square centred at (cy, cx) of each image, clipped at
    the borders (DeVries & Taylor 2017)."""
    _, _, h, w = x.shape
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    top, left = cy - side // 2, cx - side // 2
    in_rows = (r >= top[:, None]) & (r < top[:, None] + side)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + side)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


# -- batches ----------------------------------------------------------------------------------
def _seed_of(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


class TrainBatches:
    """This process's share of every global batch, augmented and normalised.

    The order is :class:`lbkernels.data.ScheduledBatchSampler`'s (a permutation per
    epoch, global batches split contiguously across ranks); ``batch_size`` is the global
    batch per epoch. ``generator`` draws the augmentation and is part of a checkpoint.
    """

    def __init__(self, dataset: Dataset, batch_size: Callable[[int], int], *, seed: int,
                 augment: bool, cutout: int, rank: int, world_size: int):
        self.dataset = dataset
        self.sampler = ScheduledBatchSampler(dataset.train_size, batch_size, rank=rank,
                                             world_size=world_size, seed=seed)
        self.augment = augment and dataset.is_image
        self.cutout = cutout if dataset.is_image else 0
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(_seed_of(seed, 1))

    def num_batches(self, epoch: int) -> int:
        return self.sampler.num_batches(epoch)

    def taken(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained on (non-zero in a run resumed mid-epoch)."""
        state = self.sampler.state_dict()
        return state["step"] if state["epoch"] == epoch else 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, global batch size) from the sampler's position on."""
        self.sampler.set_epoch(epoch)
        sizes = self.sampler.global_batch_sizes(epoch)
        device = self.dataset.train_labels.device
        for indices in self.sampler:
            step = self.sampler.state_dict()["step"] - 1
            total = sizes[step]
            lo = sum(split_evenly(total, self.world_size)[: self.rank])
            x, y = self.dataset.train_sample(torch.tensor(indices, device=device))
            yield self._transform(x, total, lo), y, total

    def _transform(self, x: torch.Tensor, total: int, lo: int) -> torch.Tensor:
        # Drawn for the whole global batch, in a fixed order, then sliced to this share.
        g, h, w = self.generator, x.shape[2], x.shape[3]
        share = slice(lo, lo + len(x))

        def draw(high: int) -> torch.Tensor:
            return torch.randint(0, high, (total,), generator=g)[share].to(x.device)

        if self.augment:
            dy, dx, flip = draw(9), draw(9), draw(2).bool()
            x = random_crop_flip(x, dy, dx, flip)
        x = self.dataset.normalise(x)
        if self.cutout:
            cy, cx = draw(h), draw(w)
            x = cutout(x, cy, cx, self.cutout)
        return x

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])


def test_batches(dataset: Dataset, batch_size: int, rank: int, world_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of the test set (every ``world_size``-th sample), in batches."""
    x, y = dataset.test_inputs[rank::world_size], dataset.test_labels[rank::world_size]
    for i in range(0, len(y), batch_size):
        yield dataset.normalise(x[i:i + batch_size]), y[i:i + batch_size]
