"""Byzantine attacks on task vectors, and fault injection for clients.

An attack replaces an attacker's honest task vector tau (its update theta_i - theta0, over
the merged parameters) after honest training, so runs with and without attackers share
the same honest training (and the client-update cache). One pure function per attack,
registered by name; `label_flip` instead changes the attacker's training data.

Where each attack runs:
- `sign_flip`, `scale`, `gaussian`, `random`: on the attacker's own client, from its tau;
- `label_flip`: on the attacker's client, during training (labels y -> C - 1 - y);
- `alie`: colluding attackers (Baruch et al., 2019, "A Little Is Enough") all send
  mu - z * sigma, coordinate-wise, with mu and sigma estimated from the attackers' OWN
  honest updates (the paper's non-omniscient setting). Clients cannot see each other, so
  the strategy applies it to the attackers' replies: it stands for their side channel.

Faults (`FAULTS`) make a client misbehave instead: crash (raise), nan (send NaN weights),
malformed (send a wrongly shaped update), timeout (reply after a delay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


class AttackConfigError(ValueError):
    """An attack or fault specification that cannot be applied; the message says why."""


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[..., Any]
    where: str  # "client" (tau -> tau'), "training" (data), "collusion" (all attackers' taus)
    defaults: dict[str, float] = field(default_factory=dict)


ATTACKS: dict[str, Attack] = {}


def _register(name: str, where: str, **defaults: float):
    def deco(fn):
        ATTACKS[name] = Attack(name, fn, where, dict(defaults))
        return fn

    return deco


def _flat_norm(tau: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tau.values()))


@_register("sign_flip", "client", scale=1.0)
def sign_flip(tau: Mapping[str, torch.Tensor], scale: float = 1.0, seed: int = 0) -> StateDict:
    """tau' = -scale * tau: the attacker pushes the merge away from its task's direction."""
    return {k: -scale * v for k, v in tau.items()}


@_register("scale", "client", factor=10.0)
def scale(tau: Mapping[str, torch.Tensor], factor: float = 10.0, seed: int = 0) -> StateDict:
    """tau' = factor * tau: an over-weighted (boosted) update that dominates a mean."""
    return {k: factor * v for k, v in tau.items()}


@_register("gaussian", "client", sigma=0.0)
def gaussian(tau: Mapping[str, torch.Tensor], sigma: float = 0.0, seed: int = 0) -> StateDict:
    """tau' ~ N(0, sigma^2 I); sigma = 0 means the honest update's root mean square,
    ||tau|| / sqrt(P), so the noise has about the honest update's norm."""
    p = sum(v.numel() for v in tau.values())
    s = sigma if sigma > 0 else _flat_norm(tau) / math.sqrt(max(p, 1))
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * s).to(v.dtype)
            for k, v in tau.items()}


@_register("random", "client")
def random_direction(tau: Mapping[str, torch.Tensor], seed: int = 0) -> StateDict:
    """tau' = ||tau|| * u with u uniform on the unit sphere: a random update of the honest
    norm (norm-based defences cannot tell it apart)."""
    noise = gaussian(tau, sigma=1.0, seed=seed)
    n, target = _flat_norm(noise), _flat_norm(tau)
    return {k: v * (target / n if n > 0 else 0.0) for k, v in noise.items()}


@_register("label_flip", "training")
def label_flip(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y' = C - 1 - y: the attacker trains honestly on wrong labels."""
    return (num_classes - 1) - labels


def alie_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f honest clients must look 'further' than
    the attackers; z = Phi^-1((n - s) / n)."""
    n, f = num_clients, num_attackers
    s = math.floor(n / 2 + 1) - f
    q = (n - s) / n
    if not 0 < q < 1:
        return 0.0
    return NormalDist().inv_cdf(q)


@_register("alie", "collusion", z=0.0)
def alie(attacker_taus: Sequence[Mapping[str, torch.Tensor]], num_clients: int,
         z: float = 0.0) -> StateDict:
    """Every attacker sends mu - z * sigma (coordinate-wise mean and population std of the
    attackers' own honest updates). z = 0 means Baruch et al.'s z_max for (n, f): a shift
    small enough to stay inside the honest spread, so median/trimmed mean/Krum keep it."""
    f = len(attacker_taus)
    if f == 0:
        raise AttackConfigError("alie needs at least one attacker")
    zz = z if z > 0 else alie_z(num_clients, f)
    out = {}
    for k in attacker_taus[0]:
        stack = torch.stack([t[k].double() for t in attacker_taus])
        mu, sigma = stack.mean(0), stack.std(0, correction=0)
        out[k] = (mu - zz * sigma).to(attacker_taus[0][k].dtype)
    return out


FAULTS = ("crash", "nan", "malformed", "timeout")


@dataclass(frozen=True)
class AttackPlan:
    """Who attacks how, and which clients fail how (by partition id)."""

    attack: str = ""
    attackers: tuple[int, ...] = ()
    params: dict[str, float] = field(default_factory=dict)
    faults: dict[int, str] = field(default_factory=dict)  # partition id -> fault kind
    fault_delay: float = 0.0  # seconds a 'timeout' client sleeps before replying

    @property
    def where(self) -> str:
        return ATTACKS[self.attack].where if self.attack else ""

    def attacks(self, pid: int) -> bool:
        return bool(self.attack) and pid in self.attackers


def parse_plan(attack: str, attackers: str, attack_params: str, faults: str,
               num_clients: int, fault_delay: float = 0.0) -> AttackPlan:
    """Parse the run-config strings: attack name, attackers ('6,7' partition ids, or 'last:2'),
    attack params ('scale=4'), faults ('crash@1,nan@2'). One AttackConfigError naming what
    is wrong."""
    attack = attack.strip()
    if attack and attack not in ATTACKS:
        raise AttackConfigError(f"unknown attack '{attack}'; known: {', '.join(sorted(ATTACKS))}")
    ids = _client_ids("attackers", attackers, num_clients)
    if attack and not ids:
        raise AttackConfigError(f"attack '{attack}' given but no attackers (e.g. attackers=last:2)")
    if ids and not attack:
        raise AttackConfigError("attackers given but no attack (e.g. attack=sign_flip)")
    params: dict[str, float] = {}
    for item in attack_params.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep:
            raise AttackConfigError(f"attack-params item '{item}' is not key=value")
        allowed = ATTACKS[attack].defaults if attack else {}
        if key not in allowed:
            raise AttackConfigError(f"attack '{attack or '(none)'}' has no parameter '{key}'"
                                    f"; it takes: {', '.join(allowed) or 'none'}")
        try:
            params[key] = float(value)
        except ValueError:
            raise AttackConfigError(f"attack-params {key}={value!r} is not a number") from None
        if not math.isfinite(params[key]) or params[key] < 0:
            raise AttackConfigError(f"attack-params {key}={value} must be finite and >= 0")
    fault_map: dict[int, str] = {}
    for item in faults.replace(" ", ",").split(","):
        if not item:
            continue
        kind, sep, pid = item.partition("@")
        if not sep or kind not in FAULTS:
            raise AttackConfigError(f"fault '{item}' is not <kind>@<partition id> with kind in "
                                    f"{', '.join(FAULTS)}")
        if not pid.isdigit():
            raise AttackConfigError(f"fault '{item}' is not <kind>@<partition id>: '{pid}' is not "
                                    "one partition id")
        (p,) = _client_ids("faults", pid, num_clients)
        fault_map[p] = kind
    if fault_delay < 0 or not math.isfinite(fault_delay):
        raise AttackConfigError(f"fault-delay must be a finite number >= 0, got {fault_delay}")
    return AttackPlan(attack, tuple(ids), params, fault_map, fault_delay)


def _client_ids(key: str, text: str, num_clients: int) -> list[int]:
    text = text.strip()
    if not text:
        return []
    if text.startswith("last:"):
        try:
            f = int(text[5:])
        except ValueError:
            raise AttackConfigError(f"{key}='{text}': expected last:<count>") from None
        if not 0 <= f <= num_clients:
            raise AttackConfigError(f"{key}='{text}': count must be in 0..{num_clients}")
        return list(range(num_clients - f, num_clients))
    try:
        ids = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise AttackConfigError(f"{key}='{text}': expected partition ids like '1,3' or last:<count>") from None
    bad = [i for i in ids if not 0 <= i < num_clients]
    if bad:
        raise AttackConfigError(f"{key}: partition id(s) {bad} outside 0..{num_clients - 1}")
    return ids


def attack_update(plan: AttackPlan, tau: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """An attacker's client-side replacement of its honest task vector."""
    spec = ATTACKS[plan.attack]
    if spec.where != "client":
        raise AttackConfigError(f"attack '{plan.attack}' is not applied to one update")
    return spec.fn(tau, **{**spec.defaults, **plan.params}, seed=seed)
