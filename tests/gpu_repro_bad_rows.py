"""Bad input to fastlora::lora_linear_fwd on CUDA (run as a script by tests/test_cuda_lora.py and
bench/gpu_check.sh; not collected by pytest): each call must raise ValueError naming the argument,
and a valid 16-row call must run; a bad call of the same extension's CPU op comes first. A crash
(SIGSEGV) on every check whose message formatted an integer was seen on an H100 (2026-11-26 and -27);
faulthandler prints where, and the exit code says which step did not behave."""

import faulthandler
import sys

import torch

sys.path.insert(0, "tests")
faulthandler.enable()
from test_cuda_lora import Case, cuda_fwd  # noqa: E402

import fastlora  # noqa: E402,F401


def expect_value_error(what: str, fn, words: str) -> None:
    print(f"{what}: ", end="", flush=True)
    try:
        fn()
    except ValueError as exc:
        assert words in str(exc), f"{what}: message does not name {words!r}: {exc}"
        print("ValueError ok", flush=True)
        return
    raise AssertionError(f"{what}: no ValueError")


# The same extension's CPU op first: an integer in the message (the CUDA crash came with those; is it the toolchain?)
expect_value_error("CPU op, wrong numel", lambda: torch.ops.fastlora.dequantize_4bit(
    torch.zeros(4, dtype=torch.uint8), torch.ones(1), 64, "nf4", 9, torch.float32), "packed")
case = Case(16, 64, 32, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
print("M=16: ", end="", flush=True)
y, _ = cuda_fwd(case)
torch.cuda.synchronize()
print(f"ran, y {tuple(y.shape)}", flush=True)

dense = list(case.args("cuda"))
dense[1], dense[2] = torch.randn(32, 64, dtype=torch.bfloat16, device="cuda"), None
expect_value_error("dense weight", lambda: torch.ops.fastlora.lora_linear_fwd(*dense), "weight")
for rows in (17, 64):
    big = Case(rows, 64, 32, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    expect_value_error(f"M={rows}", lambda big=big: cuda_fwd(big), f"M={rows}")
wrong = list(case.args("cuda"))
wrong[7] = wrong[7][:, :3]  # lora_B (N, r-1)
expect_value_error("lora_B shape", lambda: torch.ops.fastlora.lora_linear_fwd(*wrong), "lora_B")
print("all ok")
