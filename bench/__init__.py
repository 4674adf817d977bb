"""The benchmarks (`python bench/run.py`): see BENCHMARKS.md."""
