"""Flower's flat run-config strings -> typed values, in one place.

Flower's run config holds only scalars and flat strings, so lists, per-client values, seeded
spreads and method parameters travel as strings ("fedavg,ties", "50,100", "50..300",
"ties.density=0.3", "rho=0.1|0.5"); `fl_merge.config.run_config.RunConfig` parses them here, and only
here. Errors are ConfigError: one line saying what is wrong.
"""

from __future__ import annotations

import math
from typing import Any

from fl_merge.core.values import did_you_mean, parse_value, split_list


class ConfigError(ValueError):
    """A run configuration that cannot run; the message (one line) says what is wrong."""

    def __init__(self, message: object = "", *args: object) -> None:
        from fl_merge.core.task_vectors import one_line

        super().__init__(one_line(message), *args)


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """The error for a run-config key that does not exist: the closest known key when one is
    a letter or two off (`lamdas` -> did you mean 'lambdas'?), then every known key."""
    return ConfigError(f"unknown run-config key '{key}'{did_you_mean(key, known)}; known: {', '.join(known)}")


def parse_method_params(text: str) -> dict[str, Any]:
    """'density=0.2 rho=0.5' (spaces or commas) -> {'density': 0.2, 'rho': 0.5};
    'rho=0.1|0.5' -> {'rho': [0.1, 0.5]} (a grid for search=paper)."""
    out: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise ConfigError(f"method-params item '{item}' is not name=value")
        name, value = item.split("=", 1)
        value = value.strip()
        # a|b|c: several values, a grid the search tries (search=paper)
        out[name.strip()] = [parse_value(v) for v in value.split("|")] if "|" in value else parse_value(value)
    return out


def resolve_methods(method: str, method_params: str, num_clients: int | None = None, search: str = "off"
                    ) -> list[tuple[str, dict[str, Any]]]:
    """'fedavg,ties' + 'ties.density=0.2 seed=1' -> [(fedavg, {}), (ties, {density: 0.2})].

    A prefixed parameter goes to that method; an unprefixed one to every listed method
    that takes it. A parameter no listed method takes, or a prefix naming a method not
    listed, is an error; so are unknown methods, invalid values, and (given num_clients)
    a method that cannot run with that many clients.
    """
    from fl_merge.merging.registry import check_method_params
    from fl_merge.methods import get_method
    from fl_merge.core.task_vectors import MergeInputError

    names = split_list(method)
    if not names:
        raise ConfigError("method is empty: name at least one merge method")
    if len(set(names)) != len(names):
        raise ConfigError(f"method lists a method twice: '{method}'")
    taken = {n: get_method(n).params for n in names}  # raises on unknown methods
    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in parse_method_params(method_params).items():
        prefix, _, pname = key.rpartition(".")
        if prefix:
            if prefix not in params:
                raise ConfigError(f"method-params '{key}': '{prefix}' is not among the methods {names}")
            params[prefix][pname] = value
            continue
        takers = [n for n in names if pname in taken[n]]
        if not takers:
            if len(names) == 1:  # let the registry name the method's parameters
                check_method_params(names[0], {pname: value})
            raise MergeInputError(f"unknown parameter(s) ['{pname}'] for merge methods {names}")
        for n in takers:
            params[n][pname] = value
    from fl_merge.merging.search import check_space_params

    for n in names:
        check_space_params(n, params[n], num_clients, searched=search == "paper")
    return [(n, params[n]) for n in names]


DEFAULT_ETAS = "0.5,1,1.5,2,2.5,3"  # the shared eta grid of search=off when etas is empty


# Integers travel to clients in Flower config records: signed 64 bits.
INT64_MAX = 2**63 - 1


def _number(key: str, value: Any, conv: type) -> Any:
    """`value` (a number or its text) as a finite `conv` (int or float); ConfigError naming
    `key` otherwise. Booleans are not numbers; integers must fit in 64 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: {value!r} is not a valid {conv.__name__}")
    try:
        out = conv(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: '{value}' is not a valid {conv.__name__}") from None
    if conv is int and isinstance(value, float) and value != out:
        raise ConfigError(f"{key}: '{value}' is not a whole number")
    if conv is float and not math.isfinite(out):
        raise ConfigError(f"{key}: '{value}' is not a finite number")
    if conv is int and not -INT64_MAX - 1 <= out <= INT64_MAX:
        raise ConfigError(f"{key}: {value} does not fit in 64 bits")
    return out


def _per_client(key: str, value: Any, k: int, conv: type, seed: int = 0) -> list:
    """One value for all, a comma list of k values, or a spread 'lo..hi' drawn per client
    (seeded): integers uniformly in [lo, hi], floats log-uniformly (lr 0.003..0.03)."""
    if isinstance(value, str) and ".." in value:
        return _draw_spread(key, value, k, conv, seed)
    items = split_list(value) if isinstance(value, str) else [value]
    if not items:
        raise ConfigError(f"{key} is missing: give one value or a comma list of {k} values")
    nums = [_number(key, v, conv) for v in items]
    if any(n <= 0 for n in nums):
        raise ConfigError(f"{key} must be positive, got '{value}'")
    if len(nums) == 1:
        return nums * k
    if len(nums) != k:
        raise ConfigError(f"{key} lists {len(nums)} values for {k} clients")
    return nums


def _draw_spread(key: str, value: str, k: int, conv: type, seed: int) -> list:
    import hashlib

    import numpy as np

    lo_text, _, hi_text = value.partition("..")
    lo, hi = _number(key, lo_text.strip(), conv), _number(key, hi_text.strip(), conv)
    if not 0 < lo <= hi:
        raise ConfigError(f"{key}: spread '{value}' needs 0 < lo <= hi")
    digest = hashlib.sha256(f"{key}:{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if conv is int:
        return [int(v) for v in rng.integers(lo, hi, size=k, endpoint=True)]
    return [float(v) for v in np.exp(rng.uniform(np.log(lo), np.log(hi), size=k))]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{key}: '{value}' is not true or false")
    if kind == "int":
        return _number(key, value, int)
    if kind == "float":
        return _number(key, value, float)
    # str fields also take TOML numbers (local-steps=200), nothing else: a list, a table or
    # a boolean would silently become its repr.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: {value!r} is not a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: '{value}' is not a finite number")
    return str(value)


def check_client_gpus(gpus: Any, where: str) -> float:
    """A simulated client's GPU share (Flower client resources num_gpus): a number >= 0,
    and > 0 only where torch sees a CUDA GPU (Ray would otherwise wait forever)."""
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0:
        raise ConfigError(f"{where}={gpus!r} must be a number >= 0 (GPU share per client)")
    if gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{where}={gpus} but torch sees no CUDA GPU on this machine")
    return float(gpus)
