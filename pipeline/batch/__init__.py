"""Batch inference over many studies: discovery, fingerprints, sharding, prefetch, resume, Ray.

Entry point: :func:`pipeline.batch.run.run_batch` (the ``osteoplan batch`` command calls it).
Every study goes through the same :class:`pipeline.study.StudyRunner` as ``osteoplan run``.
"""
