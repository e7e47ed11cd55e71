"""Deployment helpers: credentials for a secure SuperLink (`credentials`; also
``python -m fl_merge.deploy.credentials``) and the child processes of a run (`processes`:
their environment, their output streamed to a log, stopping a whole process tree) and
`fl-merge-supernode` / `fl-merge-superlink` (`launchers`: Flower's SuperNode with the
heartbeat interval as a setting, Flower's SuperLink with sqlite's busy timeout as one).

May import: nothing of fl-merge's own.
"""
