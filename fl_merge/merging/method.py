"""What a merge method declares about itself, in its one ``register(...)`` call
(fl_merge/merging/registry.py): the types of those declarations and the checks of a
parameter's value that method files share.

Everything the rest of fl-merge reads about a method is a field of `MergeMethod`: the
validation search reads `space`, `fl-merge merge` reads `per_tensor_exact`, a Flower round
reads `needs` (which statistics the clients must send), the Hydra configs read `params`, the
docs' table (`method_table`) reads all of them. No second table of method facts exists.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fl_merge.core.task_vectors import MergeInputError


@dataclass(frozen=True)
class Derived:
    """A knob grid computed from the round's task vectors at merge time: fn(task_vectors)."""

    fn: Callable[[Sequence[Mapping[str, torch.Tensor]]], list[float]]
    doc: str

    def __repr__(self) -> str:
        return self.doc


# How a per-client statistic (an "extra") is laid out; fl_merge/merging/statistics.py checks it.
DIAGONAL = "diagonal"  # one array per task-vector key, of its shape, non-negative (a diagonal Fisher)
GRAM = "gram"  # for the 2-D weights [d_out, d_in] it covers (the same for every client), a
#               symmetric [d_in, d_in] matrix: the Gram matrix of that layer's inputs
LAYOUTS = {DIAGONAL: "", GRAM: "[d_in, d_in] per linear weight"}  # layout -> its docs' note


@dataclass(frozen=True)
class Needs:
    """The client statistics a method cannot run without.

    local_steps: each client's local step count; normalisers: FedNova's a_i per client (a
    client without one falls back on its local steps); extras: names of per-client arrays
    (e.g. "fisher": a Flower round asks its clients for them with the training flag
    ``compute-<name>``); layouts: extra name -> its layout where it is not DIAGONAL (the
    task vectors' keys and shapes), e.g. {"gram": GRAM}; theta0: the base model itself, for
    methods defined on the models theta_i = theta0 + tau_i rather than on their task
    vectors (slerp, karcher: norms and angles of the models)."""

    local_steps: bool = False
    normalisers: bool = False
    extras: tuple[str, ...] = ()
    theta0: bool = False
    layouts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stray = sorted(set(self.layouts) - set(self.extras))
        if stray:
            raise ValueError(f"Needs: layouts given for {stray}, which are not among extras")
        bad = {n: v for n, v in self.layouts.items() if v not in LAYOUTS}
        if bad:
            raise ValueError(f"Needs: unknown layout(s) {bad}; known: {', '.join(LAYOUTS)}")

    def layout(self, name: str) -> str:
        """The layout of extra `name` (DIAGONAL unless declared otherwise)."""
        return self.layouts.get(name, DIAGONAL)

    def describe(self) -> str:
        """One line for the docs' table ("" when the method needs nothing)."""
        out = (["local steps"] if self.local_steps else []) + \
            (["normalisers (else local steps)"] if self.normalisers else []) + \
            [f"{n} ({LAYOUTS[self.layout(n)]})" if LAYOUTS[self.layout(n)] else n for n in self.extras]
        return ", ".join(out)  # theta0 is the server's own, not something clients send


@dataclass(frozen=True)
class Paper:
    """Where a method comes from: its citation and, when the implementation follows one,
    the reference code (a repository, optionally with a file)."""

    citation: str
    code: str = ""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    fn: the pure function. Coordinate-wise: ``fn(stacked[K, n], p[K], **params) -> Tensor[n]``
        (stacked is scratch: the function may overwrite it). Whole-vector:
        ``fn(task_vectors, p, **params) -> StateDict``. Either form that declares a
        ``local_steps`` argument receives the clients' step counts (float64 [K] tensor, or
        None when unknown); one that declares ``normalisers`` receives FedNova's a_i
        (float64 [K], `per_client.normalisers_tensor`: reported ones, else the plain-SGD
        a_i = t_i from the steps, else None); one that declares ``names`` receives the
        clients' names (list of str, or None when the caller gave none); one that declares
        ``extras`` receives the extra arrays (coordinate-wise: name -> stacked [K, n] block;
        whole-vector: name -> list of per-client dicts); a whole-vector one that declares
        ``device`` gets the resolved torch.device for its arithmetic; a whole-vector one that
        declares ``theta0`` gets the base model (a dict with the task vectors' keys).
    params: name -> default value of the method's hyper-parameters (from fn's signature).
    needs: the client statistics it cannot run without (`Needs`).
    space: its validation search space in its own units, knob -> values or `Derived`
        (knobs not listed stay at their values; lambda is always searched).
    lambda_scale: how its paper applies lambda: "sum" (eta = K * lambda) or "delta"
        (eta = lambda), or callable(params) -> either (fl_merge.merging.scales).
    per_tensor_exact: whether running it on each tensor alone (`fl-merge merge`) is the
        method itself (bool, or callable(params) -> bool); else a layer-wise variant.
    paper, formula: its source and a one-line formula of Delta, for the docs' table.
    min_clients: a check ``(K, params) -> None`` raising MergeInputError when K is too small.
    check_params: a check ``(params) -> None`` raising MergeInputError on invalid values.
    merges_matrices: it merges 2-D weight matrices by their structure (SVD, least squares)
        and only averages or keeps the other tensors: a model with no 2-D tensor among the
        merged ones is refused before any training (`registry.check_model_fits`).
    personal: the method gives each client its own model (`fl_merge.merging.personal`): its fn
        (whole-vector) returns a `PersonalDeltas`, and so does `merge`; a round scores each
        client on its own model theta0 + eta * Delta_i. Client weights are refused (each
        client gets its own model), and `fl-merge merge` (one output file) refuses it.
    coefficients: for linear methods (Delta = sum_i c_i tau_i), ``(p, **per_client,
        **params) -> c[K]``; `merge` then streams the clients' rows with fused multiply-adds
        instead of gathering [K, n] blocks (same result as `fn`, the reference on a block).
    global_pass: ``(task_vectors, p, device, params) -> stats``, small global statistics of
        the whole update (TIES's thresholds and tie sign, Krum's distances, CClip's
        coefficients) streamed over the task vectors; fn(..., stats=stats) on any subset of
        whole tensors is then exactly that subset of the whole merge, so a large-model round
        merges the method group by group (fl_merge/merging/passes.py). fn takes `stats`.
    takes_*: which of the per-client arguments above fn's signature declares.
    """

    name: str
    fn: Callable
    coordinatewise: bool
    params: dict = field(default_factory=dict)
    needs: Needs = Needs()
    space: Mapping[str, tuple | Derived] = field(default_factory=dict)
    lambda_scale: str | Callable[[dict], str] = "sum"
    per_tensor_exact: bool | Callable[[dict], bool] = False
    paper: Paper | None = None
    formula: str = ""
    summary: str = ""
    aliases: tuple[str, ...] = ()
    min_clients: Callable[[int, dict], None] | None = None
    check_params: Callable[[dict], None] | None = None
    merges_matrices: bool = False
    coefficients: Callable | None = None
    personal: bool = False
    global_pass: Callable | None = None
    takes_local_steps: bool = False
    takes_normalisers: bool = False
    takes_names: bool = False
    takes_extras: bool = False
    takes_device: bool = False
    takes_theta0: bool = False

    # Read-only views of `needs` for older callers (one declaration: `needs`).
    @property
    def needs_local_steps(self) -> bool:
        return self.needs.local_steps

    @property
    def needs_normalisers(self) -> bool:
        return self.needs.normalisers

    @property
    def needs_extras(self) -> tuple[str, ...]:
        return self.needs.extras


def is_number(value) -> bool:
    """A finite real number (int or float; a bool or a numeric string is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def is_integer(value) -> bool:
    """An integer, or a float with an integral value (1.0 from a config file); not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return is_number(value) and float(value).is_integer()


def number_param(params: Mapping, name: str) -> float:
    """params[name] as a float, or MergeInputError unless it is a finite real number."""
    value = params[name]
    if not is_number(value):
        raise MergeInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)
