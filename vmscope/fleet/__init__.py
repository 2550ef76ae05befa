"""``vmscope fleet``: one introspection command over many guests, on Dask.

:mod:`.targets` reads the target list, :mod:`.work` is what runs on a
worker for one target, :mod:`.textdiff` compares kernel text across guests
of one build, :mod:`.cli` drives a Dask cluster (a LocalCluster by default)
and prints the results.
"""
