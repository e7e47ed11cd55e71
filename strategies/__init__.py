"""Flower strategies: thin glue over fl_merge. Installed as `fl_merge_strategies`; a checkout's
root app (`flwr run .`) loads it as `strategies`, so its modules import each other relatively.

`OneShotMerge(settings=RoundSettings)` (or `OneShotMerge(method=..., method_params=...)`)
builds and checks the round's messages; `strategies.merge_round.run_round` runs the round's
typed steps (fl_merge.round) in order, reading the settings, never the strategy's attributes. The
named subclasses fix the method for readability (`FedNovaMerge()`, `TiesMerge(...)`).

May import: every package of fl_merge up to fl_merge.config, and fl_merge.deploy; never the
clients, the engine or the CLI.
"""

from fl_merge.round.updates import ClientUpdate, MergeRoundError
from .one_shot import (
    CClipMerge,
    DareMerge,
    FedGMAMerge,
    FedNovaMerge,
    FisherMerge,
    KrumMerge,
    MedianMerge,
    OneShotMerge,
    TaskArithmeticMerge,
    TiesMerge,
    TrimmedMeanMerge,
)

__all__ = [
    "CClipMerge", "ClientUpdate", "DareMerge", "FedGMAMerge", "FedNovaMerge", "FisherMerge",
    "KrumMerge", "MedianMerge", "MergeRoundError", "OneShotMerge", "TaskArithmeticMerge",
    "TiesMerge", "TrimmedMeanMerge",
]
