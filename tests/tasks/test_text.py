"""Text tasks and the text-model plumbing: byte encoding, the offline corpora, splits, the
per-example Fisher loop used by backbones that cannot run under vmap."""

from __future__ import annotations

import numpy as np
import torch

from fl_merge.data.offline import decode_texts, encode_texts


def test_texts_round_trip_through_bytes_and_cut_on_a_character_boundary():
    texts = ["plain", "naïve café ✓", "", "x" * 40]
    assert decode_texts(encode_texts(texts, max_bytes=64)) == texts
    x = encode_texts(["ab✓"], max_bytes=4)  # ✓ is 3 bytes: cutting at 4 must drop it whole
    assert x.dtype == torch.uint8 and x.shape == (1, 4)
    assert decode_texts(x) == ["ab"]


def test_bbc_news_has_five_topics_from_sorted_folders_without_reprints():
    from fl_merge.data.offline import load_bbc_news

    texts, labels, topics = load_bbc_news()
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    # 2225 files; 113 repeat another article in the bytes a model reads (reprints, edits)
    assert len(texts) == len({t.encode()[:512] for t in texts}) == len(labels) == 2112
    assert np.bincount(labels).tolist() == [503, 366, 401, 502, 340]


def test_tweets_split_into_four_disjoint_domains_with_three_sentiments():
    from fl_merge.data.offline import TWEET_DOMAINS, load_tweets

    tweets = load_tweets()
    assert set(tweets) == set(TWEET_DOMAINS)
    seen: set[str] = set()
    for domain, (texts, labels) in tweets.items():
        assert len(texts) == len(set(texts)) == len(labels) > 3000, domain
        assert set(labels.tolist()) == {0, 1, 2}, domain
        assert not seen & set(texts)  # a tweet matching two domains belongs to neither
        seen |= set(texts)
    assert any("@united" in t.lower() for t in tweets["airline"][0])
    assert not any("@united" in t.lower() for t in tweets["apple"][0])


def test_text_suite_tasks_are_deterministic_disjoint_splits():
    from fl_merge.tasks.registry import SUITES, TASK_KINDS, load_task

    assert SUITES["text"] == ["bbc-news", "tweets-airline", "tweets-apple", "tweets-deflategate",
                              "tweets-driverless"]
    assert {TASK_KINDS[t] for t in SUITES["text"]} == {"text"}
    for name in ("bbc-news", "tweets-apple"):
        a, b = load_task(name, 0), load_task(name, 0)
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])
        splits = [set(decode_texts(s.tensors[0])) for s in (a.train, a.val, a.test)]
        assert len(splits[0]) > 900 and len(splits[1]) > 150 and len(splits[2]) > 400
        assert not (splits[0] & splits[2]) and not (splits[1] & splits[2])
        assert a.num_classes == (5 if name == "bbc-news" else 3)
        assert int(a.train.tensors[1].max()) == a.num_classes - 1
    other = load_task("tweets-apple", 1)
    assert not torch.equal(other.train.tensors[0], load_task("tweets-apple", 0).train.tensors[0])


def test_fisher_loop_equals_vmap_fisher():
    """Backbones that tokenise in forward take the per-example loop; it must give the same
    diagonal Fisher as the vmap path."""
    from fl_merge.tasks.registry import SplitSizes, load_task
    from fl_merge_clients.training import diagonal_fisher
    from fl_merge.models.registry import build_model

    torch.manual_seed(0)
    task = load_task("rotate90", 0, SplitSizes(train=64, val=8, test=8))
    model = build_model("mnist-cnn", task.num_classes)
    vmapped = diagonal_fisher(model, task.train, n_samples=24, seed=3, chunk=8)
    model.backbone.supports_vmap = False
    looped = diagonal_fisher(model, task.train, n_samples=24, seed=3, chunk=8)
    assert set(vmapped) == set(looped)
    for k in vmapped:
        assert torch.allclose(vmapped[k], looped[k], rtol=1e-4, atol=1e-9), k
    assert sum(float(v.sum()) for v in looped.values()) > 0


def test_a_text_client_trains_and_sends_fisher_and_gradient_extras(tmp_path):
    """One MiniLM client, Flower-free: a couple of steps on tweets, with the per-example Fisher
    loop and the gradient at theta0 travelling as extras shaped like the backbone. The tweets
    are a small CSV task (20 apple tweets per sentiment): the client scores its fine-tuned
    model on val and test, and MiniLM forward passes over the registered task's 700 val and
    test tweets were most of this test's time."""
    import csv

    from fl_merge_clients.client_app import local_train
    from fl_merge.data.offline import SENTIMENTS, load_tweets
    from fl_merge.models.registry import is_merged_key, pretrained_backbone
    from fl_merge.core.task_vectors import EXTRA_PREFIX

    texts, labels = load_tweets()["apple"]
    with open(tmp_path / "apple.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, SENTIMENTS[y]) for c in range(3)
                    for t, y in [(t, y) for t, y in zip(texts, labels) if y == c][:20])
    theta0 = pretrained_backbone("minilm-l6")
    config = {"model": "minilm-l6", "tasks": [f"csv:{tmp_path / 'apple.csv'}"], "data": "tasks", "data-seed": 0,
              "local-steps": 2, "lr": 0.01, "batch-size": 8, "seed": [0], "cache": False,
              "compute-fisher": True, "fisher-samples": 3, "compute-grad0": True, "grad0-samples": 16}
    state, metrics = local_train(config, 0, theta0)
    assert metrics["local-steps"] == 2 and metrics["cached"] == 0
    assert 0.0 <= metrics["finetuned-accuracy"] <= 1.0
    moved = sum(float((state[k] - theta0[k]).abs().sum()) for k in theta0)
    assert moved > 0
    for extra in ("fisher", "grad0"):
        arrays = {k[len(f"{EXTRA_PREFIX}{extra}."):]: v for k, v in state.items()
                  if k.startswith(f"{EXTRA_PREFIX}{extra}.")}
        assert set(arrays) == {k for k in theta0 if is_merged_key(k)}
        assert all(arrays[k].shape == theta0[k].shape for k in arrays)
    fisher = [v for k, v in state.items() if k.startswith(f"{EXTRA_PREFIX}fisher.")]
    assert min(float(v.min()) for v in fisher) >= 0 and sum(float(v.sum()) for v in fisher) > 0
