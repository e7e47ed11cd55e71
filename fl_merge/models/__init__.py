"""Models: the registry of backbones and task heads and the rule saying which parameters are
merged (`registry`), the built-in and published backbones (`backbones`, `hub`, `hf`,
`image_layers`), the one SGD loop (`training`), multi-task training on the union of the tasks'
data, the one-shot FL gap's reference (`multitask`), scoring a model on a split (`evaluation`)
and where a client runs, with the run's one device default (`device`).

May import: fl_merge.core, fl_merge.data, fl_merge.merging, fl_merge.methods.
"""
