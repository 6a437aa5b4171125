"""fastfc benchmarks: see cases.py (the registry), run.py and test_bench_core.py."""
