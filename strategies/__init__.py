"""Flower strategies: thin glue over fl_merge.

`OneShotMerge(method=..., method_params=...)` runs any registered method; the named
subclasses fix the method for readability (`FedNovaMerge()`, `TiesMerge(method_params=...)`).
"""

from strategies.one_shot import (
    CClipMerge,
    ClientUpdate,
    DareMerge,
    FedGMAMerge,
    FedNovaMerge,
    FisherMerge,
    KrumMerge,
    MedianMerge,
    MergeRoundError,
    OneShotMerge,
    TaskArithmeticMerge,
    TiesMerge,
    TrimmedMeanMerge,
)

__all__ = [
    "CClipMerge",
    "ClientUpdate",
    "DareMerge",
    "FedGMAMerge",
    "FedNovaMerge",
    "FisherMerge",
    "KrumMerge",
    "MedianMerge",
    "MergeRoundError",
    "OneShotMerge",
    "TaskArithmeticMerge",
    "TiesMerge",
    "TrimmedMeanMerge",
]
