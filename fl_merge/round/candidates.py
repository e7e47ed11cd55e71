"""The round's candidates: each method expanded into its knob settings, each setting with its
own eta list (its lambda grid in its own units), all from the same task vectors.

search="paper": every method's declared space (fl_merge.merging.search) x the lambda grid.
search="off": today's protocol: each method at its fixed parameters.
Either way the scale is a lambda grid converted per method, or (lambdas None) one eta grid
shared by every method (the old, unfair protocol, kept for comparison and old configs).
With LiNeS (`lines`, fl_merge/merging/lines.py) every setting is crossed with the LiNeS
settings (the paper's beta grid under search=paper, the one given setting under off), which
replace lambda: each such candidate has the one eta of lambda 1.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.core.values import parse_value, split_list
from fl_merge.merging.lines import check_lines, depths, lines_settings
from fl_merge.merging.registry import get_method
from fl_merge.merging.scales import check_lambda, eta_for_lambda, lambda_for_eta
from fl_merge.merging.search import LAMBDAS, Derived, expand, knob_grids

SEARCH_MODES = ("paper", "off")
Grid = tuple | Derived


@dataclass
class Candidate:
    """One knob setting of one method: `label` is unique in the round (the method label
    itself under search=off), `method` the method's label, `name` the registered name."""

    label: str
    method: str
    name: str
    params: dict[str, Any]  # full parameters
    knobs: dict[str, Any] = field(default_factory=dict)  # the searched values of this setting
    etas: list[float] = field(default_factory=list)  # 0 (the base) first
    lines: dict[str, Any] | None = None  # its LiNeS setting (replaces lambda), None: none

    def lam(self, eta: float, num_models: int) -> float:
        """The paper's lambda of `eta` for this setting."""
        return lambda_for_eta(self.name, eta, num_models, self.params)


WEIGHTINGS = ("uniform", "num-examples")


def personal_method(name: str) -> bool:
    """Whether registered method `name` gives each client its own model (EMR); False for a
    name that is no registered method (e.g. the greedy soup's candidate)."""
    try:
        return get_method(name).personal
    except MergeInputError:
        return False


def check_weighting(weighting: str, names: Sequence[str]) -> str:
    """ValueError, one line, for an unknown weighting, or num-examples with a personal method
    (EMR gives each client its own model: client weights mean nothing to it, and it would
    silently ignore them)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be 'uniform' or 'num-examples', got '{weighting}'")
    personal = [n for n in names if personal_method(n)]
    if weighting != "uniform" and personal:
        raise ValueError(f"weighting={weighting} cannot apply to {', '.join(personal)}: it gives each "
                         "client its own model and takes no client weights; use weighting=uniform "
                         "(or run it in a run of its own)")
    return weighting


def check_search(search: str) -> str:
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got '{search}'")
    return search


def scale_etas(name: str, params: Mapping[str, Any], lambdas: Sequence[float] | None,
               etas: Sequence[float], num_models: int) -> list[float]:
    """0 then the method's etas: the lambdas converted in its own units, or the shared etas."""
    if lambdas is None:
        return sorted({0.0, *map(float, etas)})
    return [0.0, *sorted({eta_for_lambda(name, lam, num_models, params) for lam in lambdas})]


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plan_candidates(methods: Mapping[str, tuple[str, dict[str, Any]]],
                    spaces: Mapping[str, Mapping[str, Grid]], search: str,
                    lambdas: Sequence[float] | None, etas: Sequence[float],
                    task_vectors: Sequence[Mapping[str, torch.Tensor]],
                    lines: Mapping[str, Any] | None = None) -> dict[str, Candidate]:
    """candidate label -> Candidate, methods in order, each method's settings in grid order.

    spaces[label]: the method's knob grids (`method_spaces`), searched with search=paper;
    lambdas: each setting's lambda grid in its own units (None: the shared `etas`);
    lines: LiNeS as given (None: off), each setting crossed with its settings."""
    check_search(search)
    k = len(task_vectors)
    out: dict[str, Candidate] = {}
    scalings = [None] if lines is None else (
        lines_settings(lines) if search == "paper" else [check_lines(lines)])
    for label, (name, params) in methods.items():
        grids = spaces.get(label, {}) if search == "paper" else {}
        settings = expand(name, params, grids, task_vectors) if grids else [dict(params)]
        for setting, ls in itertools.product(settings, scalings):
            knobs = {n: setting[n] for n in grids if n in setting}
            if ls is not None:
                knobs.update({"lines.alpha": ls["alpha"], "lines.beta": ls["beta"]})
            cand = label if not knobs else f"{label}[{','.join(f'{n}={_fmt(v)}' for n, v in knobs.items())}]"
            if cand in out:
                cand = f"{cand}#{len(out)}"
            cand_etas = (scale_etas(name, setting, lambdas, etas, k) if ls is None
                         else [0.0, eta_for_lambda(name, 1.0, k, setting)])
            out[cand] = Candidate(cand, label, name, setting, knobs, cand_etas, ls)
    return out


def method_spaces(given: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Grid]]:
    """label -> the knob grids searched for it (search.knob_grids of the params the user gave)."""
    return {label: knob_grids(name, params) for label, (name, params) in given.items()}


def candidate_methods(candidates: Mapping[str, Candidate]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The candidates as a Methods table (label -> (name, params)) for merging.merge_methods."""
    return {c.label: (c.name, c.params) for c in candidates.values()}


def candidate_lines(candidates: Mapping[str, Candidate]) -> dict[str, dict[str, Any]]:
    """label -> LiNeS setting of the candidates that have one (merging.merge_methods' lines)."""
    return {c.label: c.lines for c in candidates.values() if c.lines is not None}


def search_record(candidates: Mapping[str, Candidate], spaces: Mapping[str, Mapping[str, Grid]],
                  search: str, lambdas: Sequence[float] | None, num_models: int) -> dict[str, Any]:
    """What run.json records of the search: per method its space, settings and count."""
    from fl_merge.merging.search import describe

    per: dict[str, Any] = {}
    for c in candidates.values():
        m = per.setdefault(c.method, {"name": c.name, "knobs": describe(spaces.get(c.method, {}))
                                      if search == "paper" else {}, "settings": [], "candidates": 0})
        m["settings"].append(c.knobs)
        m["candidates"] += sum(1 for e in c.etas if e > 0)
        m["lambdas"] = [round(c.lam(e, num_models), 12) for e in c.etas if e > 0]
    total = sum(m["candidates"] for m in per.values())
    return {"mode": search, "lambdas": None if lambdas is None else list(lambdas),
            "candidates": total, "methods": per}


def parse_lines(text: str, search: str) -> dict[str, Any] | None:
    """The run config's `lines` (LiNeS, fl_merge/merging/lines.py): "" or "off": none; "paper":
    the paper's (its beta grid under search=paper); else items "alpha=A beta=B1|B2 ...
    pattern=REGEX" (a value with | or , is a grid: search=paper only; pattern last, read to
    the end). The items given, checked; ValueError (one line) otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"lines must be text: off, paper or 'alpha=A beta=B', got {text!r}")
    text, out = text.strip(), {}
    if text in ("", "off"):
        return None
    hit = re.search(r"(?:^|\s)pattern=", text)
    if hit:
        text, out["pattern"] = text[:hit.start()], text[hit.end():].strip()
    for item in ([] if text == "paper" else text.split()):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"lines item '{item}' is not name=value (lines: off, paper or 'alpha=A beta=B')")
        values = [parse_value(v) for v in re.split(r"[|,]", value)]
        out[name] = values if len(values) > 1 else values[0]
    grids = [k for k, v in out.items() if isinstance(v, list)]
    if grids and search != "paper":
        raise ValueError(f"lines gives several values for {', '.join(grids)} (a grid): that needs "
                         "search=paper")
    _ = lines_settings(out) if search == "paper" else check_lines(out)
    return out


def check_lines_layers(text: str, search: str, merged_keys: Sequence[str]) -> None:
    """The run config's `lines` finds at least two layers among the merged parameters' names
    (checked on theta0, before any client trains); ValueError (one line) otherwise."""
    lines = parse_lines(text, search)
    if lines is not None:
        depths(merged_keys, check_lines({k: v for k, v in lines.items() if k == "pattern"})["pattern"])


def resolve_lambdas(search: str, lambdas: str, etas: str, methods: Sequence[tuple[str, Mapping[str, Any]]],
                    lines: str = "") -> list[float] | None:
    """The run config's scale grid: the lambdas given, else search.LAMBDAS with search=paper
    and no shared etas, else None (the shared eta grid). ValueError, one line, for a bad
    search mode, lambdas and etas both given, a bad lambda, or a grid with search=off; also
    for a bad `lines`, LiNeS's per-layer lambda (`parse_lines`), checked here."""
    from fl_merge.merging.search import is_grid

    check_search(search)
    parse_lines(lines, search)
    grids = [f"{n}.{k}" for n, p in methods for k, v in p.items() if is_grid(v)]
    if grids and search == "off":
        raise ValueError(f"method-params gives several values for {', '.join(grids)}: a grid needs "
                         "search=paper")
    if lambdas.strip() and etas.strip():
        raise ValueError("give lambdas (each method's own scale) or etas (one shared eta grid), not both")
    if not lambdas.strip():
        return list(LAMBDAS) if search == "paper" and not etas.strip() else None
    values = [check_lambda(item, "lambdas") for item in split_list(lambdas)]
    if not values:
        raise ValueError(f"lambdas must be positive finite numbers, got '{lambdas}'")
    return sorted(set(values))
