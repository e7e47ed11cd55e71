"""Flower strategies: thin glue over fl_merge.

`OneShotMerge(method=..., method_params=...)` builds and checks the round's messages;
`strategies.merge_round.run_round` runs the round's steps (fl_merge.round) in order. The
named subclasses fix the method for readability (`FedNovaMerge()`, `TiesMerge(...)`).
"""

from fl_merge.round.updates import ClientUpdate, MergeRoundError
from strategies.one_shot import (
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
