"""Development tools, not the runtime: the fake upstream, the demo, benchmarks, process helpers."""
