"""fl-merge: model merging as one-shot federated learning.

Task vector tau_i = theta_i - theta0. An aggregator returns a mean-like update Delta and the
merged model is theta0 + eta * Delta; Task Arithmetic with lambda is one-shot FedAvg with
eta = K * lambda.
"""

from fl_merge.aggregation import available_methods, eta_for_task_arithmetic, merge
from fl_merge.merged import load_merged
from fl_merge.task_vectors import MergeInputError, apply_update, split_state, task_vector

__version__ = "0.1.0"

__all__ = [
    "MergeInputError",
    "apply_update",
    "available_methods",
    "eta_for_task_arithmetic",
    "load_merged",
    "merge",
    "split_state",
    "task_vector",
]
