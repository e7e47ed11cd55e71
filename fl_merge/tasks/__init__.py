"""Tasks: the task registry and suites (`registry`), the built-in image and text tasks
(`image`, `text`; their offline data is fl_merge.data), tasks declared from data (`specs`,
`from_data`) and one dataset split across K clients (`partitions`).

May import: fl_merge.core, fl_merge.data, fl_merge.models.
"""
