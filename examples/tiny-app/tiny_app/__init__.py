"""A tiny Flower app whose clients fl-merge merges (docs/own_app.md)."""
