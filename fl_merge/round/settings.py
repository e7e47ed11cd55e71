"""RoundSettings: everything one merge round is told, checked once, as one typed object.

The ServerApp builds it once from the resolved run config
(`fl_merge.config.run_config.ResolvedConfig.round_settings`); a Python user builds it with
`RoundSettings.build(...)` (OneShotMerge's keyword arguments are this function's). Every step
of the round (strategies/merge_round.py) reads its settings from here, never from the
strategy's attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl_merge.merging.lines import check_lines, lines_settings
from fl_merge.merging.scales import check_lambda
from fl_merge.merging.search import LAMBDAS, is_grid
from fl_merge.round import coefficients as coef
from fl_merge.round.attacks import AttackPlan
from fl_merge.round.candidates import Grid, check_search, check_weighting, method_spaces, parse_lines
from fl_merge.round.chunks import DEFAULT_GROUP_BYTES
from fl_merge.round.keys import DEFAULT_MERGE_KEYS, key_matcher, parse_merge_keys
from fl_merge.round.merging import Methods, given_params, label_methods
from fl_merge.round.prescreen import check_prescreen


@dataclass(frozen=True)
class CoefficientSettings:
    """The learned-coefficient phase (fl_merge/round/coefficients.py); mode "off": none."""

    mode: str = "off"  # off | task | block
    objective: str = "supervised"  # supervised (aTLAS) | entropy (AdaMerging)
    rounds: int = 5
    lr: float = 0.05


@dataclass(frozen=True)
class PrescreenSettings:
    """Two-stage validation scoring (fl_merge/round/prescreen.py); fraction 0: off."""

    fraction: float = 0.0
    finalists: int = 3


@dataclass(frozen=True)
class RoundSettings:
    """One round's settings, checked (see `build`). methods: label -> (name, params), the
    first the primary; spaces: label -> knob grids (searched with search="paper"); lambdas:
    the lambda grid in each method's own units, None for the shared `etas` (0 first)."""

    methods: Methods
    etas: list[float]
    spaces: dict[str, dict[str, Grid]] = field(default_factory=dict)
    search: str = "off"
    lambdas: list[float] | None = None
    test_all_etas: bool = False
    weighting: str = "uniform"
    merge_keys: tuple[str, ...] = tuple(DEFAULT_MERGE_KEYS)
    device: str = "cpu"
    task_names: list[str] | None = None  # partition id -> task name
    measure_heterogeneity: bool = True
    min_clients: int = 0
    attack_plan: AttackPlan = field(default_factory=AttackPlan)
    coefficients: CoefficientSettings = field(default_factory=CoefficientSettings)
    greedy_soup: bool = False
    spill_dir: str | None = None  # train replies and task vectors spilled there (large models)
    chunk_bytes: int = 0  # > 0: messages to/from fl-merge's own clients carry at most this (chunks.py)
    prescreen: PrescreenSettings = field(default_factory=PrescreenSettings)
    ensemble: bool = False
    lines: dict[str, Any] | None = None  # LiNeS as given (fl_merge/merging/lines.py); None: off

    @property
    def is_merged(self) -> Callable[[str], bool]:
        """Whether a parameter name is merged (matches a merge-key pattern)."""
        return key_matcher(self.merge_keys)

    @property
    def spilling(self) -> bool:
        """A large-model round (spill or chunk-mib): updates, task vectors, theta0 and the
        Deltas live in memory-mapped files, not in the ServerApp's memory."""
        return self.spill_dir is not None or self.chunk_bytes > 0

    @property
    def group_bytes(self) -> int:
        """How many bytes of task vectors a large-model round merges at once: one chunk, or
        DEFAULT_GROUP_BYTES when only spilling."""
        return self.chunk_bytes or DEFAULT_GROUP_BYTES

    @property
    def fixed_methods(self) -> Methods:
        """The methods whose parameters are fixed (a method whose knobs are searched keeps
        the settings K allows: its defaults need not fit)."""
        return {m: v for m, v in self.methods.items() if self.search != "paper" or not self.spaces.get(m)}

    @classmethod
    def build(
        cls,
        method: str = "fedavg",
        method_params: dict[str, Any] | None = None,
        methods: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        etas: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        test_all_etas: bool = False,
        weighting: str = "uniform",
        merge_keys: str | Sequence[str] = DEFAULT_MERGE_KEYS,
        device: str = "cpu",
        task_names: Sequence[str] | None = None,
        measure_heterogeneity: bool = True,
        min_clients: int = 0,
        attack_plan: AttackPlan | None = None,
        search: str = "off",
        lambdas: Sequence[float] | str | None = "default",
        learn_coefficients: str = "off",
        coef_objective: str = "supervised",
        coef_rounds: int = 5,
        coef_lr: float = 0.05,
        greedy_soup: bool = False,
        spill_dir: str | None = None,
        chunk_bytes: int = 0,
        prescreen: float = 0.0,
        finalists: int = 3,
        ensemble: bool = False,
        lines: dict[str, Any] | str | None = None,
        *,
        checked: bool = False,
    ) -> RoundSettings:
        """Check and normalise; ValueError (one line) naming what is wrong. lambdas:
        "default" = search.LAMBDAS with search="paper", the shared `etas` with "off".
        checked=True: the values come from `RunConfig.resolve()`, which has made every one of
        these checks already (they are not made twice); only the normalising is done."""
        if methods is None:
            methods = [(method, dict(method_params or {}))]
        elif method_params:
            raise ValueError("give method_params inside `methods`, not both")
        labelled = label_methods(methods)  # label -> (name, full params)
        if not labelled:
            raise ValueError("no merge method given")
        given = given_params(methods)
        if isinstance(lambdas, str):
            if lambdas != "default":
                raise ValueError(f"lambdas must be a list of numbers, None or 'default', got '{lambdas}'")
            lambdas = LAMBDAS if search == "paper" else None
        if lambdas is not None:
            lambdas = sorted({float(v) for v in lambdas})
        if isinstance(lines, str):  # the run config's form (candidates.parse_lines)
            lines = parse_lines(lines, search)
        if not checked:
            _check(search, given, lambdas, weighting, (learn_coefficients, coef_objective, coef_rounds, coef_lr),
                   [name for name, _ in labelled.values()], float(prescreen), int(finalists), test_all_etas)
            if lines is not None:  # LiNeS: its grid (search=paper) or its one setting, checked
                grids = [k for k, v in dict(lines).items() if is_grid(v)]
                if grids and search != "paper":
                    raise ValueError(f"lines gives several values for {', '.join(grids)} (a grid): "
                                     "that needs search=paper")
                _ = lines_settings(lines) if search == "paper" else check_lines(lines)
        return cls(
            methods=labelled, etas=sorted({0.0, *map(float, etas)}), spaces=method_spaces(given),
            search=search, lambdas=lambdas, test_all_etas=test_all_etas, weighting=weighting,
            merge_keys=parse_merge_keys(merge_keys), device=device,
            task_names=list(task_names) if task_names is not None else None,
            measure_heterogeneity=measure_heterogeneity, min_clients=min_clients,
            attack_plan=attack_plan or AttackPlan(),
            coefficients=CoefficientSettings(learn_coefficients, coef_objective, int(coef_rounds),
                                             float(coef_lr)),
            greedy_soup=bool(greedy_soup), spill_dir=spill_dir, chunk_bytes=int(chunk_bytes),
            prescreen=PrescreenSettings(float(prescreen), int(finalists)), ensemble=bool(ensemble),
            lines=None if lines is None else dict(lines),
        )


def _check(search: str, given: Methods, lambdas: list[float] | None, weighting: str,
           coefficients: tuple[str, str, int, float], names: list[str], prescreen: float, finalists: int,
           test_all_etas: bool) -> None:
    """The checks `RunConfig.resolve()` makes for a run config, for settings given directly
    (OneShotMerge's keyword arguments); ValueError naming what is wrong."""
    check_search(search)
    grids = [f"{label}.{k}" for label, (_, p) in given.items() for k, v in p.items() if is_grid(v)]
    if grids and search != "paper":
        raise ValueError(f"several values given for {', '.join(grids)} (a grid): that needs search=paper")
    if lambdas is not None and not lambdas:
        raise ValueError(f"lambdas must be positive numbers, at least one, got {lambdas}")
    for lam in lambdas or ():
        check_lambda(lam, "lambdas")
    check_weighting(weighting, names)
    coef.check_settings(*coefficients, "adam", names)
    check_prescreen(prescreen, finalists, test_all_etas)
