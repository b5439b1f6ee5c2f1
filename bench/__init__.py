"""The benchmark harness of issue 6: `make bench` (bench/run.py)."""
