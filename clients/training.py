"""A client's local work: attach its task head to theta0, fine-tune, score.

The per-task head is a linear probe fitted on the *frozen base* features (our analogue of
CLIP's zero-shot head in the paper) and stays frozen while the backbone is fine-tuned, so
only the shared backbone moves and the same head scores the base, fine-tuned and merged
backbones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import TaskData
from fl_merge.models.evaluation import evaluate
from fl_merge.models.assign import assign_weights_
from fl_merge.models.registry import HEAD_PREFIX, MERGED_PREFIX, TaskModel, build_model, is_merged_key
from fl_merge.models.training import fit
from fl_merge.round.keys import DEFAULT_MERGE_KEYS, key_matcher


@dataclass(frozen=True)
class LocalTrainConfig:
    steps: int
    lr: float
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.lr <= 0 or self.batch_size <= 0:
            raise ValueError(f"local training needs positive steps, lr and batch size: {self}")


# L2 strength of the probe head: keeps its logits moderate, so fine-tuning starts from a
# calibrated loss instead of huge gradients through an over-confident head.
PROBE_L2 = 1e-2
HEAD_WEIGHT = f"{HEAD_PREFIX}weight"


@torch.no_grad()
def _features(backbone: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    backbone.eval()
    device = next(backbone.parameters()).device
    return torch.cat([backbone(x[i : i + batch].to(device)) for i in range(0, len(x), batch)])


def fit_probe_head(model: TaskModel, task: TaskData, seed: int, max_iter: int = 200) -> None:
    """Fit model.head by L2-regularized logistic regression (L-BFGS) on frozen features of
    the task's probe data (default: its train split). Deterministic given the backbone,
    the data and `seed`."""
    x, y = (task.probe if task.probe is not None else task.train).tensors
    feats = _features(model.backbone, x)
    y = y.to(feats.device)
    torch.manual_seed(seed)
    head = model.head
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(feats), y) + PROBE_L2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


def model_for_task(model_name: str, task: TaskData, state: Mapping[str, torch.Tensor],
                   seed: int, device: torch.device | str = "cpu") -> TaskModel:
    """A TaskModel on `device` with `state` loaded. `state` must hold the backbone; if it also
    holds a head of the right shape that head is used, else a probe head is fitted."""
    model = build_model(model_name, task.num_classes).to(device)
    load_task_weights(model, task, state, seed)
    return model


def load_task_weights(model: TaskModel, task: TaskData, state: Mapping[str, torch.Tensor], seed: int,
                      delta: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0) -> None:
    """Set `model` in place, tensor by tensor, to `state` (+ eta * `delta`: the candidate
    apply_update(state, delta, eta)): its backbone from the "backbone." names, its head from
    "head." names of the right shape, else a probe head fitted on the new backbone, as
    model_for_task does for a new model."""
    assign_weights_(model.backbone, state, MERGED_PREFIX, delta, eta, what="backbone")
    shape = tuple(state[HEAD_WEIGHT].shape) if HEAD_WEIGHT in state else None
    if shape == tuple(model.head.weight.shape):
        assign_weights_(model.head, state, HEAD_PREFIX, delta, eta, what="head")
    else:
        fit_probe_head(model, task, seed)


class CandidateModel:
    """One task model for every candidate theta0 + eta * Delta of a scoring message: built
    on the first call, then reused, its weights set in place (load_task_weights) for each
    (delta, eta); `model_for_task(apply_update(state, delta, eta))` without the new state
    dict and the new model per candidate."""

    def __init__(self, model_name: str, task: TaskData, state: Mapping[str, torch.Tensor],
                 seed: int, device: torch.device | str = "cpu") -> None:
        self.model_name, self.task, self.state, self.seed, self.device = model_name, task, state, seed, device
        self.model: TaskModel | None = None

    def __call__(self, delta: Mapping[str, torch.Tensor], eta: float) -> TaskModel:
        if self.model is None:
            self.model = build_model(self.model_name, self.task.num_classes).to(self.device)
        load_task_weights(self.model, self.task, self.state, self.seed, delta, eta)
        return self.model


def fine_tune(model: TaskModel, task: TaskData, cfg: LocalTrainConfig) -> dict[str, float]:
    """Fine-tune the backbone (head frozen) for exactly cfg.steps SGD steps; return metrics."""
    for p in model.head.parameters():
        p.requires_grad_(False)
    res = fit(model, task.train, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
              seed=cfg.seed, params=list(model.backbone.parameters()))
    val_acc, _ = evaluate(model, task.val)
    test_acc, test_loss = evaluate(model, task.test)
    return {
        "local-steps": res.steps,  # the SGD steps that actually ran
        # FedNova's normaliser for those steps of SGD with momentum: merge(normalisers=...)
        "fednova-a": res.fednova_a,
        "train-loss": res.last_loss,
        "train-loss-first": res.first_loss,
        "finetuned-accuracy": test_acc,
        "finetuned-val-accuracy": val_acc,
        "finetuned-loss": test_loss,
    }


def diagonal_fisher(model: TaskModel, data: TensorDataset, n_samples: int, seed: int,
                    chunk: int = 64) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the backbone (Matena & Raffel 2022), keyed like the state dict:

        F_j = 1/N sum_n (d/d theta_j log p(y_n | x_n))^2,   y_n ~ p(. | x_n) (the model's own
        predictive distribution, so this estimates the true Fisher, not the empirical one)

    over the first N = n_samples training examples, with exact per-example gradients:
    torch.func.vmap over grad, or one backward per example for a backbone that cannot run
    under vmap (``supports_vmap = False``, e.g. one that tokenises in its forward)."""
    from torch.func import functional_call, grad, vmap

    model.eval()
    device = next(model.parameters()).device
    x_all = data.tensors[0][:n_samples]
    gen = torch.Generator().manual_seed(seed)
    live = {k: p for k, p in model.named_parameters() if is_merged_key(k)}
    params = {k: p.detach() for k, p in live.items()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not is_merged_key(k)}
    buffers = dict(model.named_buffers())

    def log_lik(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**p, **frozen, **buffers}, (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    vmap_ok = getattr(model.backbone, "supports_vmap", True)
    per_example = vmap(grad(log_lik), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(x_all), chunk):
        x = x_all[i : i + chunk].to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        y = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(device)
        if vmap_ok:
            for k, g in per_example(params, x, y).items():
                fisher[k] += g.pow(2).sum(0)
            continue
        for n in range(len(y)):  # plain autograd, one example at a time
            log_p = torch.log_softmax(model(x[n : n + 1]), dim=1)[0, y[n]]
            grads = torch.autograd.grad(log_p, list(live.values()), allow_unused=True)
            for k, g in zip(live, grads):
                if g is not None:  # None: the parameter is outside the graph (zero gradient)
                    fisher[k] += g.pow(2)
    return {k: v / len(x_all) for k, v in fisher.items()}


def gram_matrices(model: TaskModel, data: TensorDataset, n_samples: int,
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """RegMean's statistics (Jin et al., ICLR 2023): per torch.nn.Linear of the backbone, the
    Gram matrix of its inputs over the first N = n_samples training examples,

        G = X^T X / R,   X [R, d_in] every input row the layer saw (R = N, or N x tokens for
        a text backbone: padding positions included, as the authors' hook does),

    keyed by the layer's weight ("backbone.<module>.weight"), float32 [d_in, d_in], exactly
    symmetric. The mean over rows is the authors' normalisation (bloomberg/dataless-model-
    merging, local_trainer.py compute_grams; FusionBench's the same). Convolutions get none:
    the paper covers linear layers only (their kernels are then averaged)."""
    model.eval()
    device = next(model.parameters()).device
    linears = {name: m for name, m in model.backbone.named_modules() if isinstance(m, nn.Linear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def hook(name: str):
        def add(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        x_all = data.tensors[0][:n_samples]
        with torch.no_grad():
            for i in range(0, len(x_all), batch_size):
                model.backbone(x_all[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, g in sums.items():
        g = g / max(rows[name], 1)
        out[f"backbone.{name}.weight"] = ((g + g.T) / 2).cpu()
    return out


def trained_statistics(model: TaskModel, data: TensorDataset, config: Mapping, seed: int
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics of the fine-tuned model the round asked for (training flags
    ``compute-<name>``, fl_merge/round/merging.py train_requests): "fisher" (diagonal Fisher,
    `fisher-samples` examples) and "gram" (`gram_matrices`, `gram-samples` examples)."""
    out = {}
    if bool(config.get("compute-fisher", False)):
        out["fisher"] = diagonal_fisher(model, data, int(config.get("fisher-samples", 256)), seed)
    if bool(config.get("compute-gram", False)):  # only for the merged weights (merge-keys)
        is_merged = key_matcher([str(p) for p in config.get("merge-keys", DEFAULT_MERGE_KEYS)])
        grams = gram_matrices(model, data, int(config.get("gram-samples", 1000)))
        out["gram"] = {k: v for k, v in grams.items() if is_merged(k)}
    return out


def mean_gradient(model: TaskModel, data: TensorDataset, n_samples: int = 1024,
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """g = grad of the mean cross-entropy over the first n_samples examples, for the
    backbone parameters (keyed like the state dict). At theta0 this is the client's
    gradient for the gradient-dissimilarity measurements."""
    model.eval()
    params = {k: p for k, p in model.named_parameters() if is_merged_key(k)}
    model.zero_grad(set_to_none=True)
    x_all, y_all = data.tensors
    n = min(n_samples, len(y_all))
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        x = x_all[i : min(i + batch_size, n)].to(device)
        y = y_all[i : min(i + batch_size, n)].to(device)
        # sum over batches of (batch mean * batch share) = mean over all n examples
        (nn.functional.cross_entropy(model(x), y) * (len(y) / n)).backward()
    # a parameter outside the forward graph (e.g. an unused pooler) has zero gradient
    grads = {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    return grads
