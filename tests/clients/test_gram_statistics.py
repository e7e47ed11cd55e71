"""RegMean's client statistic: the Gram matrix of every linear layer's inputs, from a training
client (clients/training.py gram_matrices) and from a checkpoint client, checked against the
layer inputs computed here by running the backbone's layers before the linear one by hand."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from fl_merge.models.backbones import mnist_cnn_backbone

LINEAR = "backbone.7.weight"  # mnist-cnn: conv, relu, pool, conv, relu, pool, flatten, Linear(1568, 128)


def by_hand(backbone_state: dict, x: torch.Tensor) -> torch.Tensor:
    net = mnist_cnn_backbone()
    net.load_state_dict(backbone_state)
    with torch.no_grad():
        inputs = net[:7](x).double()  # what Linear(1568, 128) sees
    return (inputs.T @ inputs / len(x)).float()


def test_gram_matrices_are_the_linear_inputs_second_moments(theta0):
    from fl_merge.tasks.registry import load_task
    from fl_merge_clients.training import gram_matrices, model_for_task, trained_statistics

    task = load_task("rotate90", 0)
    model = model_for_task("mnist-cnn", task, theta0, seed=0)
    got = gram_matrices(model, task.train, n_samples=100, batch_size=32)  # 4 batches, the last short
    assert list(got) == [LINEAR] and got[LINEAR].dtype == torch.float32
    assert torch.equal(got[LINEAR], got[LINEAR].T)
    ref = by_hand({k[len("backbone."):]: v for k, v in theta0.items()}, task.train.tensors[0][:100])
    torch.testing.assert_close(got[LINEAR], ref, rtol=1e-4, atol=1e-5)
    # only for merged weights: merge-keys without the linear layer leave nothing to send
    asked = {"compute-gram": True, "gram-samples": 8}
    assert list(trained_statistics(model, task.train, asked, 0)["gram"]) == [LINEAR]
    assert trained_statistics(model, task.train, {**asked, "merge-keys": ["backbone.0.*"]}, 0) == {"gram": {}}


def test_a_checkpoint_client_sends_grams_at_its_checkpoints_weights(tmp_path, theta0):
    from fl_merge.tasks.registry import load_task
    from fl_merge.core.task_vectors import split_extras
    from fl_merge_clients.client_app import local_train

    g = torch.Generator().manual_seed(1)
    fine = {k[len("backbone."):]: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    save_file(fine, str(tmp_path / "fine.safetensors"), metadata={"local-steps": "10"})
    config = {"model": "mnist-cnn", "tasks": ["rotate90"], "data": "tasks", "data-seed": 0,
              "local-steps": 150, "lr": 0.01, "batch-size": 64, "seed": [0], "cache": False,
              "client-checkpoints": [str(tmp_path / "fine.safetensors")], "checkpoint-steps": [0],
              "compute-gram": True, "gram-samples": 64}
    state, _ = local_train(config, 0, theta0)
    _, extras = split_extras(state)
    assert set(extras) == {"gram"} and list(extras["gram"]) == [LINEAR]
    ref = by_hand(fine, load_task("rotate90", 0).train.tensors[0][:64])
    torch.testing.assert_close(extras["gram"][LINEAR], ref, rtol=1e-4, atol=1e-5)
