"""The one list of fl-merge's built-in tasks, models and merge methods.

Importing this module imports every module that registers a built-in (each registers what it
defines, next to its definition):

* tasks: clients/image_tasks.py (MNIST family) and clients/text_tasks.py (text suite), into
  the registry in clients/tasks.py, and clients/data_tasks.py (tasks declared from data:
  the folder:/csv:/jsonl:/parquet:/hf: task families);
* models: fl_merge/backbones.py (mnist-cnn, wide-mlp) and fl_merge/hub.py (efficientnet-lite0,
  minilm-l6, and the hf:/timm:/open_clip: name families), into fl_merge/models.py;
* merge methods: the modules of fl_merge/aggregation, into fl_merge/aggregation/registry.py
  (the aggregation package imports them too, to re-export the functions).

Nobody needs to import it by hand: every registry table is a `BuiltinRegistry`
(fl_merge/registration.py) that imports this module, by name, on its first use, once per
process. So the CLI, Flower's ClientApp/ServerApp processes and Ray workers all see the
built-ins, and no registry imports its registrants (no import circles). A plugin adds its own
tasks or models by calling register_task / register_model / register_model_family (or the
aggregation `register` decorator) at its import.
"""

import clients.data_tasks  # noqa: F401
import clients.image_tasks  # noqa: F401
import clients.text_tasks  # noqa: F401
import fl_merge.aggregation.averaging  # noqa: F401
import fl_merge.aggregation.hetero  # noqa: F401
import fl_merge.aggregation.robust  # noqa: F401
import fl_merge.aggregation.sparsify  # noqa: F401
import fl_merge.backbones  # noqa: F401
import fl_merge.hub  # noqa: F401
