"""The kernels suite of ``python -m fastlora bench --suite kernels`` under pytest-benchmark, collected by
``python -m pytest bench/`` (the CLI runs the same tests, fastlora/bench/pytest_kernels.py, in a pytest process of
its own and turns pytest-benchmark's JSON report into result rows).

    python -m pytest bench/bench_kernels_suite.py --benchmark-only -s      (the table is printed at the very end)

Sizes: the suite's defaults (256 tokens, 1024 -> 2816, fp32 (frozen_linear: bf16, its only dtype), every op);
FASTLORA_BENCH_QUICK=1 its --quick sizes; FASTLORA_KERNELS_SUITE the JSON of a fastlora.bench.kernels.SuiteConfig
for anything else (ops, dtypes, tokens, K, N, device, seconds per case, max runs, reference).
"""

from fastlora.bench.pytest_kernels import bench_summary, pytest_generate_tests, test_case, test_ceiling  # noqa: F401
