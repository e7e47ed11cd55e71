"""Tasks from data (fl_merge/tasks/specs.py, fl_merge/tasks/from_data.py, docs/data.md), offline, on
files the tests write: an image folder of MNIST digits, BBC News texts as CSV / JSON lines /
parquet, a CSV of image paths. The references are the sources the files were written from
(MNIST arrays, the BBC corpus), hand computations, and flwr-datasets' own partitioner."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fl_merge.tasks.specs import (
    DataTaskError,
    DataTaskSpec,
    format_task_spec,
    map_labels,
    parse_task_spec,
    split_counts,
)
from fl_merge.tasks.registry import SplitSizes, load_task
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.data.offline import MNIST_MEAN, MNIST_STD, TEXT_MAX_BYTES, decode_texts

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# --------------------------------------------------------------------------- pure parts

def test_a_spec_string_parses_with_defaults_and_percent_decoded_paths():
    spec = parse_task_spec("csv:/data/my%20news%2C2024.csv?input=body&label=topic&val=0.2&test=100")
    assert (spec.format, spec.location) == ("csv", "/data/my news,2024.csv")
    assert (spec.input, spec.label) == ("body", "topic")
    assert (spec.val, spec.test, spec.train, spec.labels, spec.probe) == (0.2, 100, None, "sorted", "train")
    assert spec.input_kind == "text"
    assert parse_task_spec("folder:/d").input_kind == "image"
    assert parse_task_spec("csv:/t.csv?kind=image&size=32&channels=3").input_kind == "image"
    hf = parse_task_spec("hf:org/news?config=en&split=train+test&probe=val")
    assert (hf.location, hf.config, hf.split, hf.probe) == ("org/news", "en", "train+test", "val")


@pytest.mark.parametrize("text, message", [
    ("xlsx:/a.xlsx", "unknown data format 'xlsx'"),
    ("csv:bbc.csv", "must be absolute"),
    ("csv:/a.csv?colour=red", "unknown option 'colour'; known: input, label"),
    ("csv:/a.csv?train=0", "train='0' must be a count of examples"),
    ("csv:/a.csv?val=2.5", "val='2.5' must be a count"),
    ("csv:/a.csv?labels=alpha", "labels='alpha' must be one of sorted, int"),
    ("csv:/a.csv?split=train", "apply to hf: datasets only"),
    ("csv:/a.csv?size=32", "apply to image inputs only"),
    ("folder:/d?kind=text", "kind must be image"),
    ("csv:/a.csv?input", "is not name=value"),
    ("csv:/a.csv?input=a&input=b", "given twice"),
])
def test_bad_specs_name_what_is_wrong(text, message):
    with pytest.raises(DataTaskError, match=message):
        parse_task_spec(text)


def test_the_structured_form_writes_a_spec_that_parses_back():
    text = format_task_spec({"format": "csv", "path": "/my data/a,b.csv", "input": "body",
                             "label": "topic", "test": 0.3, "labels": None})
    assert text == "csv:/my%20data/a%2Cb.csv?input=body&label=topic&test=0.3"
    assert "," not in text and " " not in text  # survives Flower's comma-separated task list
    spec = parse_task_spec(text)
    assert (spec.location, spec.input, spec.label, spec.test) == ("/my data/a,b.csv", "body", "topic", 0.3)
    assert format_task_spec({"format": "hf", "dataset": "org/x", "split": "train"}) == "hf:org/x?split=train"
    with pytest.raises(DataTaskError, match="a hf task needs 'dataset'"):
        format_task_spec({"format": "hf", "path": "/x"})
    with pytest.raises(DataTaskError, match=r"unknown key\(s\) \['column'\]"):
        format_task_spec({"format": "csv", "path": "/x.csv", "column": "a"})


def test_split_counts_by_hand():
    spec = DataTaskSpec("t", "csv", "/t.csv")
    # defaults: val = 15%, test = 25% (capped by what is asked), train = the rest (capped)
    assert split_counts("t", 100, spec, 2000, 500, 1000) == (60, 15, 25)
    assert split_counts("t", 10000, spec, 2000, 500, 1000) == (2000, 500, 1000)
    assert split_counts("t", 90, spec, 30, 500, 1000) == (30, 13, 22)
    given = DataTaskSpec("t", "csv", "/t.csv", train=40, val=0.1, test=0.25)
    assert split_counts("t", 200, given, 2000, 500, 1000) == (40, 20, 50)
    with pytest.raises(DataTaskError, match="has 50 examples: too few for train/val/test = 40/10/12"):
        split_counts("t", 50, DataTaskSpec("t", "csv", "/t.csv", train=40, val=10), 2000, 500, 1000)
    with pytest.raises(DataTaskError, match="each split needs at least 1"):
        split_counts("t", 5, spec, 2000, 500, 1000)  # 15% of 5 rounds to no validation example


def test_labels_map_to_sorted_values_or_are_taken_as_ids():
    ids, names = map_labels("t", "c", ["tech", "sport", "tech", "business"])
    assert names == ["business", "sport", "tech"] and ids.tolist() == [2, 1, 2, 0]
    ids, names = map_labels("t", "c", [10, 2, 2, 10, 7])  # numbers sort as numbers
    assert names == ["2", "7", "10"] and ids.tolist() == [2, 0, 0, 2, 1]
    ids, names = map_labels("t", "c", [3, 0, 1.0, 3], mode="int")
    assert ids.tolist() == [3, 0, 1, 3] and names == ["0", "1", "2", "3"]
    with pytest.raises(DataTaskError, match=r"label column 'c' has only one class \('a'\) in 3 rows"):
        map_labels("t", "c", ["a", "a", "a"])
    with pytest.raises(DataTaskError, match="labels=int needs class ids 0, 1, 2, ..., got 'x'"):
        map_labels("t", "c", [0, "x"], mode="int")
    with pytest.raises(DataTaskError, match=r"has 1 empty value\(s\) \(first at row 1\)"):
        map_labels("t", "c", ["a", math.nan, "b"])


# --------------------------------------------------------------------------- files

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """300 MNIST test digits as PNGs in <root>/<digit word>/ (folder names sort differently
    from the digits), plus a CSV of the same images' relative paths labelled even/odd."""
    from fl_merge.data.offline import load_mnist

    m = load_mnist()
    root = tmp_path_factory.mktemp("digits")
    images, labels = m["test_images"][:300], m["test_labels"][:300].astype(int)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / "img" / WORDS[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "img" / WORDS[y] / f"{i}.png")
        rows.append((f"img/{WORDS[y]}/{i}.png", "even" if y % 2 == 0 else "odd"))
    pd.DataFrame(rows, columns=["file", "parity"]).to_csv(root / "parity.csv", index=False)
    return root, images, labels


def _pixels(x: torch.Tensor) -> np.ndarray:
    """An MNIST-normalised image tensor back to uint8 pixels."""
    return np.rint((x.numpy() * MNIST_STD + MNIST_MEAN) * 255).astype(np.uint8)


def test_an_image_folder_of_mnist_digits_is_a_task_with_sorted_folder_names(digits):
    root, images, labels = digits
    task = load_task(f"folder:{root / 'img'}")
    by_pixels = {img.tobytes(): y for img, y in zip(images, labels)}
    classes = sorted(WORDS)  # eight, five, four, nine, one, seven, six, three, two, zero
    assert task.num_classes == 10 and task.probe is None
    assert [len(s) for s in (task.train, task.val, task.test)] == [180, 45, 75]  # 60/15/25 %
    seen = []
    for split in (task.train, task.val, task.test):
        x, y = split.tensors
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        for xi, yi in zip(x, y):
            raw = _pixels(xi[0])
            assert classes[int(yi)] == WORDS[by_pixels[raw.tobytes()]]  # its folder's label
            seen.append(raw.tobytes())
    assert len(set(seen)) == 300  # every image once, no overlap between splits
    # exactly the tensor the built-in MNIST tasks make from the same pixels
    from fl_merge.data.offline import mnist_to_tensor

    torch.testing.assert_close(task.test.tensors[0][:5], mnist_to_tensor(
        np.stack([_pixels(x[0]) for x in task.test.tensors[0][:5]])), rtol=0, atol=0)
    rgb = load_task(f"folder:{root / 'img'}?size=32&channels=3&probe=val")
    assert rgb.train.tensors[0].shape[1:] == (3, 32, 32) and rgb.probe is rgb.val
    grey = rgb.train.tensors[0]
    torch.testing.assert_close(grey[:, 0], grey[:, 2])  # grey images: R = G = B


def test_a_parquet_of_image_bytes_is_an_image_task(digits, tmp_path):
    """Images held in the table itself ({'bytes': png}, as `datasets` writes an Image column
    to parquet), labelled by digit id (labels=int)."""
    import io

    _, images, labels = digits
    cells = []
    for img in images[:60]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    pd.DataFrame({"image": cells, "digit": labels[:60]}).to_parquet(tmp_path / "digits.parquet")
    task = load_task(f"parquet:{tmp_path / 'digits.parquet'}?input=image&label=digit&kind=image&labels=int")
    by_pixels = {img.tobytes(): int(y) for img, y in zip(images[:60], labels[:60])}
    assert task.num_classes == int(labels[:60].max()) + 1
    x, y = task.train.tensors
    assert [by_pixels[_pixels(xi[0]).tobytes()] for xi in x] == y.tolist()


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    """300 BBC News articles (60 per topic) written as CSV, JSON lines (labels as ids) and
    parquet; returns (dir, {text[:512 bytes] -> topic}, topics)."""
    from fl_merge.data.offline import load_bbc_news

    texts, labels, topics = load_bbc_news()
    pick = np.concatenate([np.flatnonzero(labels == c)[:60] for c in range(len(topics))])
    frame = pd.DataFrame({"text": [texts[i] for i in pick],
                          "category": [topics[labels[i]] for i in pick],
                          "topic_id": labels[pick]})
    root = tmp_path_factory.mktemp("bbc")
    frame[["text", "category"]].to_csv(root / "bbc.csv", index=False)
    frame.rename(columns={"text": "body"}).to_json(root / "bbc.jsonl", orient="records", lines=True)
    frame.to_parquet(root / "bbc.parquet")
    cut = {t.encode()[:TEXT_MAX_BYTES].decode(errors="ignore"): topics[labels[i]]
           for t, i in zip(frame["text"], pick)}
    return root, cut, topics


def _check_texts(task, cut: dict[str, str], topics: list[str]) -> None:
    assert task.num_classes == 5
    seen = []
    for split in (task.train, task.val, task.test):
        x, y = split.tensors
        assert x.dtype == torch.uint8 and x.shape[1] == TEXT_MAX_BYTES
        for text, label in zip(decode_texts(x), y.tolist()):
            assert cut[text] == topics[label]  # the label the row was written with
            seen.append(text)
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("spec", [
    "csv:{root}/bbc.csv?input=text&label=category&train=150&val=50&test=50",
    "jsonl:{root}/bbc.jsonl?input=body&label=topic_id&labels=int&train=0.5&val=50&test=50",
    "parquet:{root}/bbc.parquet?input=text&label=category&train=150&val=50&test=50",
])
def test_bbc_texts_from_csv_jsonl_and_parquet(bbc, spec):
    root, cut, topics = bbc
    task = load_task(spec.format(root=root))
    assert [len(s) for s in (task.train, task.val, task.test)] == [150, 50, 50]
    _check_texts(task, cut, topics)


@pytest.mark.parametrize("tasks, message", [
    ("csv:{root}/nope.csv?input=text&label=category", "csv file '{root}/nope.csv' does not exist"),
    ("csv:{root}/bbc.csv?input=body&label=category",
     "has no column 'body' (input=); its columns: text, category"),
    ("csv:{root}/one.csv?input=text&label=category", "label column 'category' has only one class ('tech')"),
    ("tsv:{root}/bbc.tsv", "unknown data format 'tsv'"),
    ("folder:{root}/nofolder", "image folder '{root}/nofolder' does not exist"),
    ("csv:{root}/badimg.csv?input=file&label=y&kind=image",
     "image file '{root}/missing.png' (row 7, column 'file') does not exist"),
])
def test_bad_data_tasks_fail_config_resolution_with_one_line(bbc, tasks, message):
    root, _, _ = bbc
    pd.DataFrame({"text": ["a", "b", "c"], "category": ["tech"] * 3}).to_csv(root / "one.csv", index=False)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "ok.png")
    files = ["ok.png"] * 7 + ["missing.png"] + ["ok.png"] * 12
    pd.DataFrame({"file": files, "y": [0, 1] * 10}).to_csv(root / "badimg.csv", index=False)
    with pytest.raises(ConfigError) as err:
        RunConfig(num_clients=1, tasks=tasks.format(root=root)).resolve()
    assert message.format(root=root) in str(err.value) and "\n" not in str(err.value)


def test_a_text_task_for_an_image_model_is_refused(bbc):
    root, _, _ = bbc
    with pytest.raises(ConfigError, match="model 'mnist-cnn' reads image inputs but task"):
        RunConfig(num_clients=1, tasks=f"csv:{root}/bbc.csv?input=text&label=category").resolve()


def test_hugging_face_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        RunConfig(num_clients=1, model="minilm-l6",
                  tasks="hf:fl-merge-test/no-such-news?split=train&input=text&label=label").resolve()
    text = str(err.value)
    assert "cannot load Hugging Face dataset 'fl-merge-test/no-such-news', split 'train': offline" in text
    assert "declare the task as csv:/abs/no-such-news.csv?input=text&label=label" in text


def test_a_csv_task_is_split_across_clients_by_dirichlet(bbc):
    """One code path partitions built-in and data tasks (fl_merge/tasks/partitions.py): disjoint
    shares of the training pool, label-skewed, each equal to flwr-datasets' own partition
    of the same labels; shared val/test; the head's probe data held out of the pool, disjoint
    from every client's share and from the validation split that selects lambda."""
    from flwr_datasets.partitioner import DirichletPartitioner

    from fl_merge.tasks.partitions import load_partitioned_task

    root, cut, topics = bbc
    spec = f"csv:{root}/bbc.csv?input=text&label=category"
    run = RunConfig(num_clients=3, data="dirichlet", alpha=0.3, partition_task=spec,
                    partition_pool=150, model="minilm-l6").resolve()
    assert run.tasks == [f"{spec}/{i}" for i in range(3)]
    full = load_task(spec, 0, SplitSizes(train=150 + SplitSizes().val))
    parts = [load_partitioned_task(spec, "dirichlet", 3, i, alpha=0.3, pool=150) for i in range(3)]
    probe = set(map(bytes, parts[0].probe.tensors[0].numpy()))
    # 300 rows: 180 train, 45 val; the probe takes as many as val has, the pool the rest
    assert len(full.train) == 180 and len(probe) == len(full.val) == 45
    n_pool = 180 - 45
    pool_x, pool_y = full.train.tensors[0][:n_pool], full.train.tensors[1][:n_pool]
    assert probe == set(map(bytes, full.train.tensors[0][n_pool:].numpy()))
    assert all(set(map(bytes, p.probe.tensors[0].numpy())) == probe for p in parts)  # one head
    assert not probe & set(map(bytes, pool_x.numpy()))  # no client trains on the head's data
    assert not probe & set(map(bytes, full.val.tensors[0].numpy()))  # nor does it select lambda
    legacy = load_partitioned_task(spec, "dirichlet", 3, 0, alpha=0.3, pool=150, probe="val")
    assert legacy.probe is legacy.val
    rows = [set(map(bytes, p.train.tensors[0].numpy())) for p in parts]
    assert sum(len(r) for r in rows) == len(pool_y) == n_pool
    assert set.union(*rows) == set(map(bytes, pool_x.numpy()))  # disjoint, covering the pool
    import datasets

    ds = datasets.Dataset.from_dict({"idx": np.arange(n_pool), "label": pool_y.numpy()}).shuffle(seed=0)
    ref = DirichletPartitioner(num_partitions=3, partition_by="label", alpha=0.3,
                               min_partition_size=10, seed=0)
    ref.dataset = ds
    skews = []
    for i, p in enumerate(parts):
        idx = np.sort(np.asarray(ref.load_partition(i)["idx"]))
        assert p.train.tensors[1].tolist() == pool_y[idx].tolist()
        assert torch.equal(p.test.tensors[0], full.test.tensors[0])
        share = np.bincount(p.train.tensors[1].numpy(), minlength=5) / len(p.train)
        skews.append(0.5 * np.abs(share - np.bincount(pool_y.numpy(), minlength=5) / n_pool).sum())
    assert max(skews) > 0.2  # alpha=0.3: at least one client's label mix is far from the pool's


# --------------------------------------------------------------------------- Hydra, clients

def test_hydra_takes_tasks_from_data_in_their_structured_form(bbc):
    from fl_merge.cli.mapping import plan

    root, _, _ = bbc
    entry = f"{{format:csv,path:{root}/bbc.csv,input:text,label:category,test:0.2}}"
    (job,) = plan(["data=files", "model=minilm_l6", "num_clients=1", f"data.tasks=[{entry}]"], False)
    assert job.run.tasks == f"csv:{root}/bbc.csv?input=text&label=category&test=0.2"
    mapping = f"{{format:csv,path:{root}/bbc.csv,input:text,label:category}}"
    (job,) = plan(["data=dirichlet", "model=minilm_l6", "num_clients=2",
                   f"data.partition_task={mapping}"], False)
    assert job.run.partition_task == f"csv:{root}/bbc.csv?input=text&label=category"
    with pytest.raises(ConfigError, match="data.tasks is not set"):
        plan(["data=files"], False)
    with pytest.raises(ConfigError, match=r"'data.tasks': data task .* a csv task needs 'path'"):
        plan(["data=files", "data.tasks=[{format:csv,file:/x.csv}]"], False)


def test_minilm_trains_on_a_csv_task(bbc):
    """The text model reads a CSV task exactly like the built-in text tasks (byte tensors its
    tokenizer decodes): a client trains a few steps on it, Flower-free."""
    from fl_merge_clients.client_app import local_train
    from fl_merge.models.registry import pretrained_backbone

    root, _, _ = bbc
    task = f"csv:{root}/bbc.csv?input=text&label=category&train=64&val=32&test=32"
    RunConfig(num_clients=1, model="minilm-l6", tasks=task).resolve()
    theta0 = pretrained_backbone("minilm-l6")
    config = {"model": "minilm-l6", "tasks": [task], "data": "tasks", "data-seed": 0,
              "local-steps": 2, "lr": 0.01, "batch-size": 8, "seed": [0], "cache": False}
    state, metrics = local_train(config, 0, theta0)
    assert metrics["num-examples"] == 64 and metrics["local-steps"] == 2
    assert sum(float((state[k] - theta0[k]).abs().sum()) for k in theta0) > 0


def test_an_edited_data_file_is_not_served_from_the_update_cache(digits, theta0, tmp_path):
    """The client-update cache keys a data task by its files' state, not only its name."""
    import shutil

    from fl_merge_clients.client_app import local_train

    root, _, _ = digits
    folder = tmp_path / "img"
    shutil.copytree(root / "img", folder)
    config = {"model": "mnist-cnn", "tasks": [f"folder:{folder}"], "data": "tasks", "data-seed": 0,
              "local-steps": 2, "lr": 0.01, "batch-size": 16, "seed": [0], "cache": True}
    assert local_train(config, 0, theta0, tmp_path / "cache")[1]["cached"] == 0
    assert local_train(config, 0, theta0, tmp_path / "cache")[1]["cached"] == 1
    shutil.copy(next((folder / "zero").iterdir()), folder / "one" / "mislabelled.png")
    load_task.cache_clear()
    _, metrics = local_train(config, 0, theta0, tmp_path / "cache")
    assert metrics["cached"] == 0 and metrics["num-examples"] == 181  # 60% of 301 images


def test_flower_round_trains_two_clients_on_data_tasks_and_merges(digits, tmp_path):
    """End to end through Flower's simulation: K=2 mnist-cnn clients, one on the image
    folder (10 digit classes), one on the CSV of image paths (even/odd); the merged model
    at the eta chosen on validation is far above chance on both test splits."""
    from fl_merge.io import results
    from simulate import simulate_round

    root, _, _ = digits
    tasks = [f"folder:{root / 'img'}", f"csv:{root / 'parity.csv'}?input=file&label=parity&kind=image"]
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": ",".join(tasks), "local-steps": "60", "batch-size": "32",
        "search": "off", "etas": "0.5,1", "output-dir": str(tmp_path), "cache": False,
    }).resolve()
    simulate_round(cfg, 2)
    rows = results.read_rows(tmp_path / results.RESULTS_FILE)
    chosen = {r["task"]: r for r in rows if r["selected"] and r["split"] == "test"}
    assert set(chosen) == set(tasks)
    assert chosen[tasks[0]]["accuracy"] > 0.5  # 10 classes: chance 0.1
    assert chosen[tasks[1]]["accuracy"] > 0.7  # even/odd: chance 0.5
    # the saved merged model, read back for a data task by its spec, scores what was reported
    from fl_merge.models.evaluation import evaluate
    from fl_merge.io.merged import load_merged

    model = load_merged(tmp_path / results.MODEL_FILE, tasks[1])
    assert evaluate(model, load_task(tasks[1]).test)[0] == pytest.approx(chosen[tasks[1]]["accuracy"])
