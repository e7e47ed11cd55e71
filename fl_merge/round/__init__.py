"""One merge round as a sequence of pure steps (the ServerApp calls them in this order):

collect replies (updates) -> task vectors over the merge-key patterns (keys, updates) ->
colluding attacks (merging.collude) -> one Delta per method (merging) -> candidates and
their scores, grid or plain protocol (scoring) -> eta chosen on validation (selection) ->
test at the choice (scoring) -> rows and summary (tables), held in a MergeRound (outcome).

The round's settings are one typed, checked object (`settings.RoundSettings`), built once
from the resolved run config; every step reads them from there.
The message protocol these steps serve is named in `protocol` and written in docs/protocol.md.
Also here: the Byzantine attacks and faults a round can simulate (`attacks`), theta0 from a
checkpoint (`base`), the learned-coefficient and ensemble phases (`coefficients`,
`ensemble`), two-stage validation scoring (`prescreen`), failure records (`failures`) and the phase
lines' clock (`clock`).

May import: fl_merge.core, merging, methods, models, tasks, io, stats; never config, the
Flower glue, the engine or the CLI.
"""
