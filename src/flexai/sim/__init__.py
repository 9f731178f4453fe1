"""Trace simulator: openb traces, the "fill the cluster" experiment, metrics, lower bound and reports."""
