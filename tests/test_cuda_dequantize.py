"""The CUDA kernels of fastlora._C against its C++ CPU kernels, bit for bit (both use the shared
per-element math of csrc/include/fastlora/quant4.h). Runs where torch has CUDA and the extension
was built with its CUDA kernels; skipped elsewhere (compile-check covers the sources there)."""

import pytest
import torch

from fastlora import backends

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and backends.available("cuda")["cuda"]),
    reason="needs a CUDA GPU and fastlora._C built with its CUDA kernels (FASTLORA_BUILD_CUDA=1)",
)

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_4bit_cuda_matches_cpu_bitwise(seed, quant_type, blocksize):
    op = torch.ops.fastlora.dequantize_4bit
    for numel in [1, 7, 8, 9, 63, 64, 65, 1000, 4095, 4096 * 3 + 5, 1 << 20]:
        nbytes = (numel + 1) // 2
        for offset in range(4):  # misaligned packed pointers take the scalar kernel
            buf = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8)
            absmax = torch.rand(-(-numel // blocksize)) * 3
            for dtype, iv in _INT_VIEW.items():
                want = op(buf[offset:], absmax, blocksize, quant_type, numel, dtype)
                got = op(buf.cuda()[offset:], absmax.cuda(), blocksize, quant_type, numel, dtype).cpu()
                assert torch.equal(want.view(iv), got.view(iv)), (numel, offset, dtype)


@pytest.mark.parametrize("nested_blocksize", [256, 100])
def test_dequantize_absmax_cuda_matches_cpu_bitwise(seed, nested_blocksize):
    op = torch.ops.fastlora.dequantize_absmax
    for n in [1, 255, 256, 257, 100000]:
        q = torch.randint(0, 256, (n,), dtype=torch.uint8)
        code = torch.randn(256)
        absmax2 = torch.rand(-(-n // nested_blocksize))
        offset = torch.rand(())
        want = op(q, code, absmax2, offset, nested_blocksize)
        for off in (offset, offset.cuda()):
            got = op(q.cuda(), code.cuda(), absmax2.cuda(), off, nested_blocksize).cpu()
            assert torch.equal(want.view(torch.int32), got.view(torch.int32)), (n, off.device)
