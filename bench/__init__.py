"""Benchmark scripts (``python -m bench.<name>`` from the repository root); they print figures
and are never part of the test run."""
