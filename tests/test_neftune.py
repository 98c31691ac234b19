"""NEFTune (fastlora.ops.neftune_embedding, fastlora::neftune_embedding*): the lookup equals
F.embedding, every backend gives the reference's bits, the noise has the right bounds, moments and
per-sequence scale, the padded scale is transformers' to the last bit, runs reproduce (seeds,
checkpointing), gradients are F.embedding's, and bad input raises a clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastlora import backends, reference_neftune
from fastlora.ops import _dropout_seed, neftune_embedding
from fastlora.ops.neftune_embedding import triton_kernel_available

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
TRITON_REASON = None
if not triton_kernel_available():
    TRITON_REASON = "fastlora.kernels.neftune_embedding does not exist yet (the Triton kernel, other branch)"
elif not backends.available("cpu")["triton"]:
    TRITON_REASON = "Triton is not installed or TRITON_INTERPRET is unset"
BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None,
                                                                               reason=TRITON_REASON or ""))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def _op_args(tokens: int, vocab: int, dim: int, dtype, zero_every: int = 3):
    weight = torch.randn(vocab, dim).to(dtype)
    ids = torch.randint(0, vocab, (tokens,))
    mag = torch.rand(tokens) * 0.2 + 0.01
    mag[::zero_every] = 0.0
    return ids, weight, mag


def _hook_mag(alpha: float, output: torch.Tensor) -> torch.Tensor:
    """The fp32 magnitude transformers' hook computes, taken from the hook itself when installed."""
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:
        return alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2)))
    seen = []
    original = torch.Tensor.uniform_

    def spy(self, a=0.0, b=1.0, **kw):
        seen.append(b)
        return original(self, a, b, **kw)

    module = torch.nn.Module()
    module.neftune_noise_alpha = alpha
    torch.Tensor.uniform_ = spy
    try:
        neftune_post_forward_hook(module, None, output)
    finally:
        torch.Tensor.uniform_ = original
    return seen[0]


# ---------------------------------------------------------------------------------------------
# lookup part


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_equals_embedding(seed, dtype, backend):
    weight = torch.randn(97, 33).to(dtype)
    weight[5] = -0.0
    ids = torch.randint(0, 97, (3, 11))
    ids[0, 0] = 5
    ref = F.embedding(ids, weight)
    _assert_bitwise(neftune_embedding(ids, weight, 5.0, training=False, backend=backend), ref)
    _assert_bitwise(neftune_embedding(ids, weight, 0.0, backend=backend), ref)
    # mag 0 rows through the op itself: exact copies (-0.0 included)
    flat = ids.reshape(-1)
    op = {"reference": torch.ops.fastlora.neftune_embedding_reference, "cpp": torch.ops.fastlora.neftune_embedding,
          "triton": torch.ops.fastlora.neftune_embedding_triton}[backend]
    out = op(flat, weight, torch.zeros(flat.numel()), torch.tensor(12345))
    _assert_bitwise(out, ref.reshape(-1, 33))


def test_eval_and_alpha_zero_draw_no_seed(seed):
    weight = torch.randn(50, 8)
    ids = torch.randint(0, 50, (4, 6))
    state = torch.get_rng_state()
    neftune_embedding(ids, weight, 5.0, training=False)
    neftune_embedding(ids, weight, 0.0)
    assert torch.equal(state, torch.get_rng_state())
    assert _dropout_seed.pending_count(weight) == 0


@pytest.mark.parametrize("padding_idx", [0, 7, -1])
def test_padding_idx_like_torch(seed, padding_idx):
    weight = torch.randn(20, 16)
    ids = torch.randint(0, 20, (5, 9))
    ids[:, -2:] = padding_idx % 20
    grad = torch.randn(5, 9, 16)
    w_ref = weight.clone().requires_grad_()
    ref = F.embedding(ids, w_ref, padding_idx)
    ref.backward(grad)
    for training in (False, True):
        w = weight.clone().requires_grad_()
        out = neftune_embedding(ids, w, 5.0, padding_idx=padding_idx, training=training)
        if not training:
            assert torch.equal(out, ref)
        out.backward(grad)
        assert torch.equal(w.grad, w_ref.grad)
        assert torch.all(w.grad[padding_idx % 20] == 0)


# ---------------------------------------------------------------------------------------------
# backends bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 17, 64, 515, 1030])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_cpp_matches_reference_bitwise(seed, dtype, dim, tokens):
    ids, weight, mag = _op_args(tokens, 61, dim, dtype)
    for s in (0, 1, seed, 2**32 + 7, 2**63 - 1):
        _assert_bitwise(torch.ops.fastlora.neftune_embedding(ids, weight, mag, torch.tensor(s)),
                        torch.ops.fastlora.neftune_embedding_reference(ids, weight, mag, torch.tensor(s)))


@pytest.mark.skipif(TRITON_REASON is not None, reason=TRITON_REASON or "")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 64, 515])
@pytest.mark.parametrize("tokens", [1, 9])
def test_triton_matches_reference_bitwise(seed, dtype, dim, tokens):
    ids, weight, mag = _op_args(tokens, 31, dim, dtype)
    for s in (0, seed, 2**63 - 1):
        _assert_bitwise(torch.ops.fastlora.neftune_embedding_triton(ids, weight, mag, torch.tensor(s)),
                        torch.ops.fastlora.neftune_embedding_reference(ids, weight, mag, torch.tensor(s)))


def test_reference_formula_spot_check():
    """Element i = t*d + j of the contract, computed by hand from the scalar Philox."""
    ids, weight, mag = torch.tensor([2, 0]), torch.randn(3, 5), torch.tensor([0.5, 0.25])
    out = reference_neftune.neftune_embedding(ids, weight, mag, 99)
    from fastlora.reference_lora import STREAM_NEFTUNE, philox4x32_10

    for t in range(2):
        for j in range(5):
            i = t * 5 + j
            word = int(philox4x32_10(99, torch.tensor([i >> 3]), STREAM_NEFTUNE)[(i >> 1) & 3])
            bits = (word >> (16 * (i & 1))) & 0xFFFF
            u = torch.tensor(float(bits - 32768) * 2.0**-15, dtype=torch.float32)
            noise = u * mag[t]
            assert out[t, j] == weight[ids[t], j] + noise


# ---------------------------------------------------------------------------------------------
# statistics


def _moments_ok(r: torch.Tensor) -> None:
    """r ~ U(-1, 1): mean 0 (sd sqrt(1/3n)), variance 1/3 (sd sqrt(4/45n)); 6 sigma bounds."""
    r = r.double().reshape(-1)
    n = r.numel()
    assert abs(r.mean().item()) < 6 * math.sqrt(1 / 3 / n)
    assert abs(r.var().item() - 1 / 3) < 6 * math.sqrt(4 / 45 / n)
    assert r.min().item() < -0.99 and r.max().item() > 0.99


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_noise_bounds_and_moments(seed, backend):
    dim, alpha = 512, 10.0
    weight = torch.zeros(30, dim)
    ids = torch.randint(0, 30, (4, 128))
    out = neftune_embedding(ids, weight, alpha, backend=backend)  # zero weight: out is the noise exactly
    mag = _hook_mag(alpha, torch.zeros(4, 128, dim))
    assert torch.all(out.abs() <= mag)
    _moments_ok(out / mag)
    # bf16 weights: |out - w| within mag plus the final rounding
    wb = torch.randn(30, dim).to(torch.bfloat16)
    outb = neftune_embedding(ids, wb, alpha, backend=backend).float()
    base = F.embedding(ids, wb).float()
    assert torch.all((outb - base).abs() <= mag + base.abs().add(mag) * 2.0**-8)


def test_padded_mag_is_transformers_bitwise_and_moments_match_hook(seed):
    for batch, length, dim, alpha in [(2, 7, 64, 5.0), (3, 128, 4096, 10.0), (1, 2048, 5120, 15.0), (4, 33, 3, 0.1)]:
        ids = torch.randint(0, 10, (batch, length))
        mag = reference_neftune.noise_magnitudes(ids, dim, alpha, mode="padded")
        hook = _hook_mag(alpha, torch.zeros(batch, length, dim))
        assert mag.dtype == torch.float32 and mag.shape == (batch * length,)
        assert torch.equal(mag, hook.expand(batch * length))
    # fresh values: L*d beyond 2^24, alphas that are not fp32 values (the hook's expression, on the CPU as the hook
    # runs it: torch's CPU sqrt is not always correctly rounded, so a device-side or host-emulated value can differ)
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        length = int(torch.randint(1, 1 << 17, (), generator=g))
        dim = int(torch.randint(1, 1 << 14, (), generator=g))
        alpha = float(torch.rand((), dtype=torch.float64, generator=g)) * 20
        mag = reference_neftune.noise_magnitudes(torch.zeros(2, length, dtype=torch.int64), dim, alpha)
        want = alpha / torch.sqrt(torch.tensor(length * dim))
        assert torch.equal(mag, want.expand(2 * length)), (alpha, length, dim)
    # the hook's noise and ours: same bounds, same moments
    from_hook = pytest.importorskip("transformers.integrations.neftune")
    dim, alpha = 256, 5.0
    emb = torch.nn.Embedding(40, dim)
    torch.nn.init.zeros_(emb.weight)
    emb.neftune_noise_alpha = alpha
    emb.register_forward_hook(from_hook.neftune_post_forward_hook)
    ids = torch.randint(0, 40, (4, 256))
    hook_noise = emb(ids).detach()
    ours = neftune_embedding(ids, emb.weight.detach(), alpha)
    mag = _hook_mag(alpha, hook_noise)
    for noise in (hook_noise, ours):
        assert torch.all(noise.abs() <= mag)
        _moments_ok(noise / mag)


def test_per_sequence_attention_mask(seed):
    dim, alpha = 96, 8.0
    ids = torch.randint(0, 50, (3, 40))
    mask = torch.zeros(3, 40, dtype=torch.int64)
    mask[0, :] = 1
    mask[1, :13] = 1  # right padding
    mask[2, 25:] = 1  # left padding
    weight = torch.randn(50, dim)
    out = neftune_embedding(ids, weight, alpha, attention_mask=mask, mode="per_sequence")
    base = F.embedding(ids, weight)
    pad = mask == 0
    assert torch.equal(out[pad], base[pad])
    mag = reference_neftune.noise_magnitudes(ids, dim, alpha, mode="per_sequence", attention_mask=mask).view(3, 40)
    for b, length in enumerate((40, 13, 15)):
        want = _hook_mag(alpha, torch.zeros(1, length, dim))
        assert torch.equal(mag[b][mask[b] == 1], want.expand(length))
        noise = (out[b][mask[b] == 1] - base[b][mask[b] == 1]).abs()
        assert noise.max() <= want * (1 + 2.0**-20) and noise.max() > 0.9 * want
    assert torch.all(mag[pad] == 0)
    # bool and float masks mean the same
    for m in (mask.bool(), mask.float()):
        torch.manual_seed(3)
        a = neftune_embedding(ids, weight, alpha, attention_mask=m, mode="per_sequence")
        torch.manual_seed(3)
        assert torch.equal(a, neftune_embedding(ids, weight, alpha, attention_mask=mask, mode="per_sequence"))
    # padded mode ignores the mask (like transformers): every token perturbed at the padded length
    padded = neftune_embedding(ids, weight, alpha, attention_mask=mask)
    assert torch.all((padded - base).abs().amax(-1) > 0)


def test_per_sequence_packed(seed):
    dim, alpha = 64, 5.0
    lengths = [5, 17, 1, 9]
    total = sum(lengths)
    ids = torch.randint(0, 30, (1, total))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mag_pos = reference_neftune.noise_magnitudes(ids, dim, alpha, mode="per_sequence", position_ids=position_ids)
    mag_cu = reference_neftune.noise_magnitudes(ids, dim, alpha, mode="per_sequence", cu_seqlens=cu)
    want = torch.cat([_hook_mag(alpha, torch.zeros(1, n, dim)).expand(n) for n in lengths])
    assert torch.equal(mag_pos, want) and torch.equal(mag_cu, want)
    assert torch.equal(mag_cu, reference_neftune.noise_magnitudes(ids, dim, alpha, mode="per_sequence",
                                                                  cu_seqlens=cu.long()))
    weight = torch.randn(30, dim)
    torch.manual_seed(11)
    a = neftune_embedding(ids, weight, alpha, position_ids=position_ids, mode="per_sequence")
    torch.manual_seed(11)
    b = neftune_embedding(ids, weight, alpha, cu_seqlens=cu, mode="per_sequence")
    torch.manual_seed(11)
    c = neftune_embedding(ids.view(-1), weight, alpha, cu_seqlens=cu.long(), mode="per_sequence")
    assert torch.equal(a, b) and torch.equal(a.view(-1, dim), c)
    noise = (a - F.embedding(ids, weight)).abs().view(-1, dim).amax(-1)
    assert torch.all(noise <= want * (1 + 2.0**-20))
    # and from below: each token's largest of 64 draws of U(-mag, mag) is under mag / 2 with probability 2^-64,
    # while the whole row's (padded) scale would leave the 1-, 5- and 9-token sequences under 0.55x their own
    assert torch.all(noise > 0.5 * want)
    # an empty sequence (equal neighbours in cu_seqlens, as flash-attn's varlen allows) changes nothing
    cu_empty = torch.tensor([0, 5, 5, *cu[2:].tolist()], dtype=torch.int32)
    torch.manual_seed(11)
    assert torch.equal(a, neftune_embedding(ids, weight, alpha, cu_seqlens=cu_empty, mode="per_sequence"))
    # the padded (HF) scale of a packed batch uses the whole row: smaller than every sequence's own
    padded = reference_neftune.noise_magnitudes(ids, dim, alpha)
    assert torch.all(padded < want)
    # attention mask on top of packing: masked tokens get 0 and do not count
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    mag = reference_neftune.noise_magnitudes(ids, dim, alpha, mode="per_sequence", position_ids=position_ids,
                                             attention_mask=mask)
    assert torch.all(mag[3:5] == 0) and torch.equal(mag[:3], _hook_mag(alpha, torch.zeros(1, 3, dim)).expand(3))


# ---------------------------------------------------------------------------------------------
# determinism, checkpointing, gradients


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_same_seed_same_noise(seed, backend):
    weight = torch.randn(40, 48).to(torch.bfloat16)
    ids = torch.randint(0, 40, (2, 21))
    torch.manual_seed(7)
    a = neftune_embedding(ids, weight, 5.0, backend=backend)
    b = neftune_embedding(ids, weight, 5.0, backend=backend)
    torch.manual_seed(7)
    c = neftune_embedding(ids, weight, 5.0, backend=backend)
    assert torch.equal(_bits(a), _bits(c)) and not torch.equal(a, b)
    torch.manual_seed(7)
    other = "reference" if backend == "cpp" else "cpp"
    _assert_bitwise(neftune_embedding(ids, weight, 5.0, backend=other), a)


class _Model(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, train_embedding: bool, backend: str):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim), requires_grad=train_embedding)
        self.proj = torch.nn.Linear(dim, dim)
        self.backend = backend

    def region(self, ids, mask, scale):
        h = neftune_embedding(ids, self.emb, 5.0, attention_mask=mask, mode="per_sequence", backend=self.backend)
        h = F.dropout(F.gelu(self.proj(h * scale)), 0.1, training=True)
        return h


def _run(model, ids, mask, ckpt):
    torch.manual_seed(1234)
    scale = torch.ones((), requires_grad=True)  # reentrant checkpoint needs an input that requires grad
    if ckpt is None:
        h = model.region(ids, mask, scale)
    else:
        reentrant, preserve = ckpt
        h = checkpoint(model.region, ids, mask, scale, use_reentrant=reentrant, preserve_rng_state=preserve)
    loss = (h * h).sum()
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return h.detach(), grads


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("train_embedding", [True, False])
@pytest.mark.parametrize("ckpt", [(r, p) for r in (True, False) for p in (True, False)],
                         ids=lambda m: f"reentrant={m[0]}-preserve={m[1]}")
def test_checkpoint_recompute_identical(seed, backend, train_embedding, ckpt):
    model = _Model(30, 24, train_embedding, backend)
    ids = torch.randint(0, 30, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    if not ckpt[1]:
        model.region = _no_dropout_region(model)  # torch's own dropout replays only with preserved RNG state
    h0, g0 = _run(model, ids, mask, None)
    h1, g1 = _run(model, ids, mask, ckpt)
    assert torch.equal(h0, h1)
    for a, b in zip(g0, g1, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (g0[0] is None) == (not train_embedding)
    if train_embedding:
        assert _dropout_seed.pending_count(model.emb) == 0


def _no_dropout_region(model):
    def region(ids, mask, scale):
        h = neftune_embedding(ids, model.emb, 5.0, attention_mask=mask, mode="per_sequence", backend=model.backend)
        return F.gelu(model.proj(h * scale))

    return region


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_weight_grad_equals_embedding(seed, dtype, backend):
    weight = torch.randn(25, 19).to(dtype)
    ids = torch.randint(0, 25, (4, 30))  # repeated ids: the scatter-add accumulates
    grad = torch.randn(4, 30, 19).to(dtype)
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    neftune_embedding(ids, w1, 5.0, backend=backend).backward(grad)
    F.embedding(ids, w2).backward(grad)
    _assert_bitwise(w1.grad, w2.grad)


def test_frozen_weight_gets_no_grad(seed):
    weight = torch.randn(25, 19)
    ids = torch.randint(0, 25, (2, 5))
    out = neftune_embedding(ids, weight, 5.0)
    assert not out.requires_grad and weight.grad is None
    # gradients still flow to whatever consumes the output
    scale = torch.ones(19, requires_grad=True)
    (neftune_embedding(ids, weight, 5.0) * scale).sum().backward()
    assert scale.grad is not None and weight.grad is None


# ---------------------------------------------------------------------------------------------
# op contract


@pytest.mark.parametrize("suffix", ["", "_reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(seed, suffix, dtype):
    ids, weight, mag = _op_args(13, 20, 37, dtype)
    args = (ids, weight, mag, torch.tensor(2**40 + 3))
    torch.library.opcheck(getattr(torch.ops.fastlora, "neftune_embedding" + suffix), args)


@pytest.mark.skipif(TRITON_REASON is not None, reason=TRITON_REASON or "")
def test_opcheck_triton(seed):
    ids, weight, mag = _op_args(5, 20, 37, torch.float32)
    torch.library.opcheck(torch.ops.fastlora.neftune_embedding_triton, (ids, weight, mag, torch.tensor(5)))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("alpha", [np.float32(5.0), np.int64(5), torch.tensor(5), torch.tensor([5.0])],
                         ids=["numpy-float32", "numpy-int64", "0d-int-tensor", "1-element-tensor"])
def test_alpha_as_any_real_scalar(alpha):
    """Any real scalar is alpha, read once: the same noise as the Python float 5.0."""
    ids, weight = torch.randint(0, 10, (2, 6)), torch.randn(10, 4)
    torch.manual_seed(5)
    want = neftune_embedding(ids, weight, 5.0)
    torch.manual_seed(5)
    assert torch.equal(neftune_embedding(ids, weight, alpha), want)


def _call(**kw):
    args = dict(input_ids=torch.randint(0, 10, (2, 6)), weight=torch.randn(10, 4), alpha=5.0)
    args.update(kw)
    return neftune_embedding(args.pop("input_ids"), args.pop("weight"), args.pop("alpha"), **args)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(input_ids=torch.tensor([[1, 10]])), ValueError, "input_ids must be in"),
    (dict(input_ids=torch.tensor([[-1, 2]]), backend="reference"), ValueError, "input_ids must be in"),
    (dict(input_ids=torch.tensor([[1, 10]]), mode="per_sequence"), ValueError, "input_ids must be in"),
    (dict(input_ids=torch.tensor([[-1, 2]]), training=False), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids"),
    (dict(input_ids=torch.tensor([[True, False]])), TypeError, "input_ids"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha="5"), TypeError, "alpha"),
    (dict(alpha=torch.tensor([1.0, 2.0])), TypeError, "alpha"),
    (dict(alpha=torch.tensor(-2)), ValueError, "alpha"),
    (dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.ones(12), mode="per_sequence"), ValueError, "attention_mask"),
    (dict(position_ids=torch.zeros(2, 7, dtype=torch.long), mode="per_sequence"), ValueError, "position_ids"),
    (dict(cu_seqlens=torch.tensor([0, 8, 5, 12]), mode="per_sequence"), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 5, 11]), mode="per_sequence"), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([2, 5, 12]), mode="per_sequence"), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 12.0]), mode="per_sequence"), TypeError, "cu_seqlens"),
    (dict(mode="per_token"), ValueError, "mode"),
    (dict(weight=torch.randn(10, 4, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(10)), ValueError, "weight"),
    (dict(padding_idx=10), ValueError, "padding_idx"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


@pytest.mark.parametrize("suffix", ["", "_reference"])
@pytest.mark.parametrize("bad", [-1, 20, 2**40])
def test_op_rejects_ids_out_of_range(suffix, bad):
    ids, weight, mag = _op_args(6, 20, 8, torch.float32)
    ids[3] = bad
    with pytest.raises(ValueError, match="ids"):
        getattr(torch.ops.fastlora, "neftune_embedding" + suffix)(ids, weight, mag, torch.tensor(1))


def test_no_host_reads_while_capturing(monkeypatch):
    """Under CUDA graph capture (simulated: stream_capturing says yes) the ids range check reads nothing on the
    host, and cu_seqlens, which can only be validated there, is refused with a message naming it."""
    ids, weight, _ = _op_args(6, 20, 8, torch.float32)
    ids[3] = 25
    with pytest.raises(ValueError, match="ids"):
        reference_neftune.check_ids_in_range(ids, 20)
    monkeypatch.setattr(reference_neftune, "stream_capturing", lambda device: True)

    def host_read(*args, **kwargs):
        raise AssertionError("aminmax (a host read) called while capturing")

    monkeypatch.setattr(torch, "aminmax", host_read)
    reference_neftune.check_ids_in_range(ids, 20)
    ids[3] = 1
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="cu_seqlens .*CUDA graph"):
        neftune_embedding(ids.reshape(1, 6), weight, 5.0, mode="per_sequence", cu_seqlens=cu)
    out = neftune_embedding(ids.reshape(1, 6), weight, 5.0, mode="per_sequence")  # position_ids / mask: fine
    assert out.shape == (1, 6, 8)


def test_cpp_op_checks_arguments():
    ids, weight, mag = _op_args(6, 20, 8, torch.float32)
    op = torch.ops.fastlora.neftune_embedding
    with pytest.raises(TypeError, match="ids"):
        op(ids.int(), weight, mag, torch.tensor(1))
    with pytest.raises(TypeError, match="mag"):
        op(ids, weight, mag.double(), torch.tensor(1))
    with pytest.raises(ValueError, match="mag"):
        op(ids, weight, mag[:5], torch.tensor(1))
    with pytest.raises(ValueError, match="seed"):
        op(ids, weight, mag, torch.tensor(-1))
    with pytest.raises(TypeError, match="seed"):
        op(ids, weight, mag, torch.tensor(1.0))
    with pytest.raises(ValueError, match="seed"):
        op(ids, weight, mag, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="weight"):
        op(ids, weight.view(-1), mag, torch.tensor(1))


def test_torch_compile_matches_eager(seed):
    """Under torch.compile the seed draw is in the graph; with inductor's ``fallback_random`` (torch's switch
    for eager-identical random ops) the same generator gives the same noise and grads as eager."""
    weight = torch.randn(50, 32)
    ids = torch.randint(0, 50, (2, 7))

    def f(ids, w):
        return neftune_embedding(ids, w, 5.0, mode="per_sequence") * 2

    outs, grads = [], []
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (f, torch.compile(f)):
            w = weight.clone().requires_grad_()
            torch.manual_seed(5)
            out = fn(ids, w)
            out.sum().backward()
            outs.append(out.detach())
            grads.append(w.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_int32_ids_and_noncontiguous_weight(seed):
    weight = torch.randn(24, 40)
    ids = torch.randint(0, 20, (3, 8))
    torch.manual_seed(9)
    a = neftune_embedding(ids, weight, 5.0)
    torch.manual_seed(9)
    b = neftune_embedding(ids.int(), weight.t().contiguous().t(), 5.0)
    torch.manual_seed(9)
    c = neftune_embedding(ids.t().contiguous().t(), weight, 5.0)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("train_embedding", [True, False])
@pytest.mark.parametrize("ckpt", [(r, p) for r in (True, False) for p in (True, False)],
                         ids=lambda m: f"reentrant={m[0]}-preserve={m[1]}")
def test_checkpoint_two_regions_share_the_weight(seed, train_embedding, ckpt):
    """One embedding used in two checkpointed regions: backward recomputes them in reverse order,
    each must get its own seed back (the frozen weight's seed is consumed at recompute)."""
    emb = torch.nn.Parameter(torch.randn(30, 16), requires_grad=train_embedding)
    proj = torch.nn.Linear(16, 16)
    ids = torch.randint(0, 30, (2, 9))

    def region(h, ids):
        return h + F.gelu(proj(neftune_embedding(ids, emb, 5.0)))

    def run(mode):
        torch.manual_seed(77)
        h = torch.zeros(2, 9, 16, requires_grad=True)
        for _ in range(2):
            h = region(h, ids) if mode is None else checkpoint(region, h, ids, use_reentrant=mode[0],
                                                               preserve_rng_state=mode[1])
        (h * h).sum().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in (emb, *proj.parameters())]
        emb.grad = None
        proj.zero_grad(set_to_none=True)
        return h.detach(), grads

    h0, g0 = run(None)
    h1, g1 = run(ckpt)
    assert torch.equal(h0, h1)
    for a, b in zip(g0, g1, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
