"""Files: checkpoints as lazy tensor sources and the sharded safetensors writer
(`checkpoints`), checkpoint clients' files (`client_checkpoints`), a run's outputs
(`results`, `predictions`, `merged`), the sweep store (`store`), spilled client updates
(`spill`), the client-side update cache (`update_cache`) and the streamed merge of
checkpoint files behind `fl-merge merge` (`file_merge`).

May import: fl_merge.core, fl_merge.merging, fl_merge.methods, fl_merge.models.
"""
