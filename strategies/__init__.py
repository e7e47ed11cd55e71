"""Flower strategies: thin glue over fl_merge."""

from strategies.one_shot import ClientUpdate, MergeRoundError, OneShotMerge

__all__ = ["ClientUpdate", "MergeRoundError", "OneShotMerge"]
