"""What every other package stands on: state dicts and task vectors (`task_vectors`: tau =
theta - theta0, theta0 + eta * Delta, the input checks and `MergeInputError`), atomic file
writing (`files`), the one safetensors writer (`safetensors_writer`), the one parser of a
value written as text (`values`), the CPU kernels pinned to one instruction set
(`kernels`) and registries that load the built-ins on first use
(`registration`).

May import: nothing of fl-merge's own.
"""
