"""Imported last by the batch fork server: its objects are frozen before any worker is forked.

The fork server imports torch, MONAI and the pipeline once (``local.WORKER_PRELOAD``); every worker
forked from it shares those pages with it until it writes to them. A cyclic garbage collection in
a worker writes to every object it walks, and so copies the pages that hold them. Here the server
collects, then freezes what is left (``pipeline.study.freeze_long_lived``): the workers'
collections never walk those objects (BENCHMARKS.md: ~40-75 MB less private memory per worker).
"""

from pipeline.study import freeze_long_lived

freeze_long_lived()
