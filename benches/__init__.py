"""fastfc's benchmarks, run from a checkout: ``python -m benches`` (the
runner, ``runner.py``), or the pytest-benchmark suites
``pytest benches --benchmark-only``. ``cases.py`` and ``engine_cases.py``
hold the cases both time."""
