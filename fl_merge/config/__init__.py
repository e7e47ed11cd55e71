"""The run configuration: the typed `RunConfig` and its validated `ResolvedConfig`
(`run_config`), Flower's flat run-config strings parsed into typed values (`parsing`), and a
user's own methods, tasks and models named by import path (`plugins`).

May import: every package below it (core, merging, methods, models, tasks, io, stats,
round); never the Flower glue, the engine or the CLI.
"""
