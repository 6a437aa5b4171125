"""Floor 6, the tools: the command line, the demo, and the helpers that
tests, the demo and the benchmarks share (workloads, fault plans, the
promise checker)."""
