"""Names of the fl-merge message protocol, version 1 (docs/protocol.md says what each means).

Everything a ServerApp and a client exchange beyond Flower's own record layout is named
here once, so the server, fl-merge's client and the documentation cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Version 1 still: later additions are optional keys a side may ignore and still work (the
# grid reply's "test-correct", the train reply's TASK_NAME, chunked messages' train config
# "chunk-reply-bytes"; chunked messages' names are in fl_merge/round/chunks.py).
PROTOCOL_VERSION = 1
# In the server's config records: the protocol version the server speaks. In a client's
# train reply metrics: the version whose grid evaluation the client speaks (its capability).
PROTOCOL_KEY = "fl-merge-protocol"

# Train reply metrics. Required:
NUM_EXAMPLES = "num-examples"
# Optional; missing ones degrade with a note in the results (never an error):
LOCAL_STEPS = "local-steps"  # FedNova-style methods need it from every client
FEDNOVA_A = "fednova-a"  # optional: FedNova's ||a_i||_1 for the optimizer the client ran
PARTITION_ID = "partition-id"  # names the client's task (task list index)
FINETUNED_VAL_ACCURACY = "finetuned-val-accuracy"  # for normalized validation accuracy
FINETUNED_ACCURACY = "finetuned-accuracy"  # the client's own model on its test split
FINETUNED_LOSS = "finetuned-loss"
# Optional, in a ConfigRecord of the train reply (a MetricRecord holds numbers only): the
# client's own name for its task; it names the client in every result in place of tasks=.
TASK_NAME = "task-name"

# Plain evaluation: config entry saying which split to score, reply metric names.
SPLIT_KEY = "split"
SPLITS = ("val", "test")
ACCURACY = "accuracy"
LOSS = "loss"
# Grid evaluation reply, optional: "test-correct", the 0/1 correctness of every test example
# per candidate (candidate-major, in the order of "test-accuracy"), for within-run CIs.
CORRECT = "correct"


def speaks_grid(metrics: Mapping[str, Any]) -> bool:
    """A client announcing this protocol version in its train reply gets grid evaluation
    (theta0 + each Delta once + the eta grid); any other client plain evaluation."""
    value = metrics.get(PROTOCOL_KEY)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == PROTOCOL_VERSION
