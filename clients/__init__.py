"""fl-merge's Flower ClientApp (`client_app.app`): thin glue that answers the round's messages
with the pure work in fl_merge (tasks, local training, scoring). Installed as
`fl_merge_clients`; a checkout's root app (`flwr run .`) loads it as `clients`, so its
modules import each other relatively.

May import: every package of fl_merge up to fl_merge.config; never strategies or the engine.
"""
