"""Shared core of sandqueue: the task/result contract, settings, errors and Redis names.

Producers and workers both import from here; nothing in this package imports `e2b` or the
worker, so an app that only submits tasks stays light.
"""
