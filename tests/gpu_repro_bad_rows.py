"""Device check (not collected by pytest): fastlora::lora_linear_fwd on CUDA with M = 17 rows must
raise ValueError, not crash (a crash was seen once on an H100). Run by bench/gpu_check.sh."""

import faulthandler
import sys

import torch

sys.path.insert(0, "tests")
faulthandler.enable()
from test_cuda_lora import Case, cuda_fwd  # noqa: E402

import fastlora  # noqa: E402,F401

for rows in (16, 17, 64):
    case = Case(rows, 64, 32, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    try:
        y, _ = cuda_fwd(case)
        torch.cuda.synchronize()
        print(f"M={rows}: ran, y {tuple(y.shape)}")
    except ValueError as exc:
        print(f"M={rows}: ValueError: {str(exc)[:90]}")
sys.exit(0)
