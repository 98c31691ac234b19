"""Shared fixtures. Every test draws fresh random inputs from a per-test seed so failures can be
reproduced (the seed is in the test id via the `seed` fixture) yet inputs differ between tests."""

import os
import zlib

import pytest
import torch

# The Triton backend runs on CPU tensors under Triton's interpreter. The variable must be set before
# any Triton kernel is defined, i.e. before any test module imports fastlora.kernels; conftest is
# imported first. On a machine with a GPU the kernels run compiled instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test id (stable across runs, different for every test)."""
    value = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("FASTLORA_TEST_SEED", "0"))
    torch.manual_seed(value)
    return value

