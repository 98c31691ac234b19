"""Benchmarks run with pytest-benchmark: `pytest bench/ --benchmark-only` (or
`python -m fastlora bench` once that command exists). Each file prints a ratio summary at the end."""
