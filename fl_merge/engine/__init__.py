"""Running fl-merge: the one run path `run` (`run`: Flower's simulation engine, or a private
SuperLink through `superlink`) and replicates of one configuration over seeds
(`replicates`).

May import: every package of fl_merge except cli; it loads the Flower glue (strategies,
clients) by name when a run starts.
"""
