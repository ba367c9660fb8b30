"""Imported last by the batch fork server: its objects are frozen before any worker is forked.

The fork server imports torch, MONAI and the pipeline once (``local.WORKER_PRELOAD``); every worker
forked from it shares those pages with it until it writes to them. A cyclic garbage collection in
a worker writes to every object it walks, and so copies the pages that hold them. Frozen here,
collect first (``pipeline.study.freeze_long_lived``), they are never walked in the workers.
"""

from pipeline.study import freeze_long_lived

freeze_long_lived()
