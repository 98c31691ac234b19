"""fastlora.patch (first slice of issue 5) on tiny random Hugging Face models with PEFT LoRA: loss and
gradients match the unpatched model (dense fp32 and nf4 double-quant bitsandbytes bases, with and
without gradient checkpointing), unpatch is bit-exact, state_dict and parameters are untouched, two
models live side by side, unsupported layers are reported, bad input errors and PEFT save/load works."""

import copy
import sys
import warnings

import pytest
import torch
from lora_cases import loss_and_grads

import fastlora
from fastlora import nf4

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = ["llama", "qwen2"]
VOCAB = 96
# fp32: PEFT's three GEMMs (x·Wᵀ, x·Aᵀ, S·Bᵀ) and fastlora's fused ones sum in other orders.
RTOL = 1e-5


def _base(family: str):
    # in_features multiples of the blocksize 64: bitsandbytes 0.50's native CPU dequantization is wrong
    # otherwise (README, "Known differences"), e.g. for 32x32 and 64x96 weights.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))  # q/k/v have a bias
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    return model


def _to_4bit(model, quant_type="nf4", loaded_in_4bit=True):
    """Every targeted projection becomes a bitsandbytes Linear4bit (nf4 double quant, or fp4) holding
    fastlora.nf4.quantize'd weights, the way a load_in_4bit model would hold them."""
    bnb = pytest.importorskip("bitsandbytes")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is torch.nn.Linear:
                dq = quant_type == "nf4"
                q = nf4.quantize(child.weight.detach(), 64, quant_type, dq)
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=dq)
                new.weight = nf4.to_bnb(q)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, child_name, new)
    # What from_pretrained(load_in_4bit=True) reports; PEFT picks lora.bnb.Linear4bit only when it is set.
    if loaded_in_4bit:
        model.is_loaded_in_4bit = True
    return model


def _peft_model(family="llama", dropout=0.0, four_bit=None, use_dora=False, loaded_in_4bit=True, rslora=False,
                lora_bias=False):
    model = _base(family)
    if four_bit:
        _to_4bit(model, four_bit, loaded_in_4bit)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, use_dora=use_dora,
                             use_rslora=rslora, lora_bias=lora_bias)
    pm = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # B is zero-initialised by PEFT: make the LoRA branch matter
            torch.nn.init.normal_(p, std=0.05)
    return pm.train()


def _ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_close(got, want, rtol=RTOL):
    loss_g, grads_g = got
    loss_w, grads_w = want
    assert _rel(loss_g, loss_w) < rtol, (loss_g, loss_w)
    assert grads_g.keys() == grads_w.keys() and len(grads_w) > 0
    for name in grads_w:
        assert _rel(grads_g[name], grads_w[name]) < rtol, name


def _n_lora(handle):
    """How many LoRA layers the patch accelerates one by one (gated MLP blocks over them count apart)."""
    return sum(kind == "LoRA layer" for kind in handle.kinds.values())


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_dense_fp32_matches_peft(family, rslora):
    pm = _peft_model(family, rslora=rslora)
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 2 * 7 and not handle.skipped
    got = loss_and_grads(pm, ids)
    _assert_close(got, want)
    assert len(got[1]) == 2 * 7 * 2
    assert handle.report()["fallback_calls"] == {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["lora.bnb.Linear4bit", "lora.Linear-over-4bit"])
def test_4bit_bnb_matches_peft(family, quant_type, loaded_in_4bit):
    """PEFT builds lora.bnb.Linear4bit when the model reports is_loaded_in_4bit, else lora.Linear over the
    bitsandbytes layer (a different rounding in low precision): both are accelerated."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as lora_bnb

    pm = _peft_model(family, four_bit=quant_type, loaded_in_4bit=loaded_in_4bit)
    layers = _lora_layers(pm)
    want_type = lora_bnb.Linear4bit if loaded_in_4bit else peft.tuners.lora.layer.Linear
    assert len(layers) == 14 and all(type(m) is want_type for m in layers.values())
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14 and not handle.skipped
    got = loss_and_grads(pm, ids)
    _assert_close(got, want)
    assert handle.report()["fallback_calls"] == {}


def test_bf16_base_with_fp32_adapters_matches_peft():
    """A bf16 model with PEFT's default fp32 adapters: PEFT adds the fp32 LoRA term and rounds once."""
    model = _base("qwen2").to(torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).train()
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    got = loss_and_grads(pm, ids)
    assert handle.report()["fallback_calls"] == {}
    # bf16 activations: one bf16 ulp (2^-8) of difference in a layer's output moves the rest.
    _assert_close(got, want, rtol=3e-2)  # measured: loss equal, worst gradient 1.5e-2


def test_verbose_prints_the_summary(capsys):
    handle = fastlora.patch(_peft_model("llama"), verbose=True)
    err = capsys.readouterr().err
    assert err.strip() == handle.summary()
    assert err.count("\n") == 1 and "14 LoRA layer(s), 2 gated MLP(s) accelerated" in err
    # the dense output layer has no adapter: listed as unchanged, its submodules never are
    assert handle.report()["unchanged"] == {"base_model.model.lm_head": "dense linear without an adapter (nothing "
                                                                         "to fuse)"}
    assert "1 unchanged, nothing to fuse (base_model.model.lm_head)" in err


def test_dropout_cpp_matches_reference_backend():
    """With dropout 0.1 the masks are fastlora's (Philox), not torch's: compare fastlora's backends."""
    ids = _ids()
    results = {}
    for backend in ("cpp", "reference"):
        pm = _peft_model("qwen2", dropout=0.1)
        fastlora.patch(pm, backend=backend)
        results[backend] = loss_and_grads(pm, ids)
        assert torch.isfinite(results[backend][0])
    _assert_close(results["cpp"], results["reference"], rtol=1e-4)
    # Dropout is active: the loss differs from the dropout-free model's.
    pm0 = _peft_model("qwen2", dropout=0.0)
    fastlora.patch(pm0)
    assert _rel(loss_and_grads(pm0, ids)[0], results["cpp"][0]) > 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["hf-default", "non-reentrant"])
def test_gradient_checkpointing(dropout, kwargs):
    ids = _ids()
    pm = _peft_model("llama", dropout=dropout)
    plain_unpatched = loss_and_grads(pm, ids)
    fastlora.patch(pm)
    plain = loss_and_grads(pm, ids)
    if kwargs is None:
        pm.gradient_checkpointing_enable()
    else:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    pm.enable_input_require_grads()
    ckpt = loss_and_grads(pm, ids)
    # Recompute regenerates the same dropout masks: bit-identical to the patched run without checkpointing.
    assert torch.equal(plain[0], ckpt[0])
    for name in plain[1]:
        assert torch.equal(plain[1][name], ckpt[1][name]), name
    if dropout == 0.0:
        _assert_close(ckpt, plain_unpatched)


def test_unpatch_is_bit_exact_and_state_is_kept():
    pm = _peft_model("qwen2", dropout=0.1)
    ids = _ids()
    before = loss_and_grads(pm, ids)
    keys = list(pm.state_dict().keys())
    params = {n: id(p) for n, p in pm.named_parameters()}
    assert "fastlora" not in repr(pm)
    handle = fastlora.patch(pm)
    assert list(pm.state_dict().keys()) == keys
    assert {n: id(p) for n, p in pm.named_parameters()} == params
    assert all("fastlora(backend='auto', rounding='linear')" in repr(m) for m in _lora_layers(pm).values())
    assert "fastlora(" in repr(pm)
    assert fastlora.patch(pm) is handle  # idempotent
    with pytest.raises(ValueError, match="already patched"):
        fastlora.patch(pm, backend="reference")
    loss_and_grads(pm, ids)
    assert fastlora.unpatch(pm) is True
    assert not handle.active and fastlora.unpatch(pm) is False
    handle.unpatch()  # a second unpatch is a no-op
    assert "fastlora" not in repr(pm)
    assert all("forward" not in m.__dict__ and "extra_repr" not in m.__dict__ for m in pm.modules())
    after = loss_and_grads(pm, ids)
    assert torch.equal(before[0], after[0])
    for name in before[1]:
        assert torch.equal(before[1][name], after[1][name]), name
    # Patching again after unpatch gives a fresh handle.
    again = fastlora.patch(pm)
    assert again is not handle and _n_lora(again) == 14
    again.unpatch()


def test_two_models_side_by_side():
    pm = _peft_model("llama")
    other = copy.deepcopy(pm)
    ids = _ids()
    fastlora.patch(pm)
    assert "fastlora" not in repr(other)
    assert all("forward" not in m.__dict__ for m in other.modules())
    got, want = loss_and_grads(pm, ids), loss_and_grads(other, ids)
    _assert_close(got, want)
    # A deepcopy of a patched model is patched itself, bound to its own modules.
    twin = copy.deepcopy(pm)
    for m in twin.modules():
        if "forward" in m.__dict__:
            assert m.forward.__self__ is m
    _assert_close(loss_and_grads(twin, ids), want)


@pytest.mark.parametrize("four_bit", [None, "nf4"])
def test_dora_matches_peft(four_bit):
    pm = _peft_model("llama", use_dora=True, four_bit=four_bit)
    torch.manual_seed(2)
    for name, p in pm.named_parameters():
        if "lora_magnitude_vector" in name:  # away from the initial norm so the scale matters
            p.data.mul_(1 + 0.1 * torch.rand_like(p))
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14
    assert all("DoRA projections run one by one" in reason for reason in handle.skipped.values())
    assert len(handle.skipped) == 4  # the two MLP blocks and two q/k/v groups are not fused over DoRA projections
    got = loss_and_grads(pm, ids)
    _assert_close(got, want)
    assert sum("lora_magnitude_vector" in n for n in got[1]) == 14
    assert handle.report()["fallback_calls"] == {}


@pytest.mark.parametrize("four_bit", [None, "nf4"])
def test_lora_bias_matches_peft(four_bit):
    """lora_bias=True (a bias on lora_B): on qwen2 q/k/v have a base bias, the other projections none."""
    pm = _peft_model("qwen2", four_bit=four_bit, lora_bias=True)
    for name, p in pm.named_parameters():
        if "lora_B" in name and name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14 and not handle.skipped
    got = loss_and_grads(pm, ids)
    # fastlora adds base bias + s·b_B as one bias (PEFT: two adds): ulp-level activation differences that
    # reach the small k_proj gradients (~1e-6) through the softmax as ~2e-5 relative.
    _assert_close(got, want, rtol=5e-5)
    assert sum(n.endswith("lora_B.default.bias") for n in got[1]) == 14


def test_dora_with_active_dropout_falls_back_to_peft():
    pm = _peft_model("llama", use_dora=True, dropout=0.1)
    ids = _ids()
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14
    torch.manual_seed(3)
    got = loss_and_grads(pm, ids)
    assert len(handle.report()["fallback_calls"]) == 14
    handle.unpatch()
    torch.manual_seed(3)
    want = loss_and_grads(pm, ids)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    fastlora.patch(pm)
    with torch.no_grad():
        assert _rel(pm(input_ids=ids).logits, want) < RTOL


def test_several_active_adapters_and_per_call_fallbacks():
    pm = _peft_model("llama")
    ids = _ids()
    pm.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.base_model.set_adapter(["default", "second"])
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 12 and len(handle.skipped) == 4  # two q_proj and their two q/k/v groups
    assert all("2 active adapters" in r for r in handle.skipped.values())
    handle.unpatch()
    # A patched layer hands calls PEFT's forward when autocast is on or when disabled adapters change it.
    pm.base_model.set_adapter("default")
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14
    with pm.disable_adapter():
        loss_disabled = pm(input_ids=ids, labels=ids).loss
    assert len(handle.report()["fallback_calls"]) == 14 + 2 + 2  # LoRA layers, fused MLP blocks, q/k/v groups
    handle.unpatch()
    with pm.disable_adapter():
        assert torch.equal(pm(input_ids=ids, labels=ids).loss, loss_disabled)


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        fastlora.patch(object())
    with pytest.raises(TypeError, match="model"):
        fastlora.unpatch("not a model")
    with pytest.raises(ValueError, match="nothing to accelerate.*1 dense linear"):
        fastlora.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="nothing to accelerate.*no linear layers"):
        fastlora.patch(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(TypeError, match="fuse_projections"):
        fastlora.patch(_peft_model("llama"), fuse_projections="yes")
    with pytest.raises(ValueError, match="backend"):
        fastlora.patch(_peft_model("llama"), backend="gpu")


def test_all_or_nothing(monkeypatch):
    pm = _peft_model("llama")
    module = sys.modules["fastlora.modules.peft_lora"]
    real = module.skip_reason
    calls = []

    def failing(m):
        calls.append(m)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(m)

    monkeypatch.setattr(module, "skip_reason", failing)
    with pytest.raises(RuntimeError, match="boom"):
        fastlora.patch(pm)
    assert all(not k.startswith("_fastlora") and k not in ("forward", "extra_repr")
               for m in pm.modules() for k in m.__dict__)
    assert "_fastlora_handle" not in pm.__dict__
    monkeypatch.setattr(module, "skip_reason", real)
    assert _n_lora(fastlora.patch(pm)) == 14


def test_save_pretrained_from_patched_loads_into_unpatched(tmp_path):
    pm = _peft_model("qwen2", dropout=0.1)
    ids = _ids()
    handle = fastlora.patch(pm)
    loss_and_grads(pm, ids)
    pm.eval()
    with torch.no_grad():
        patched_out = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    handle.unpatch()
    with torch.no_grad():
        unpatched_out = pm(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(_base("qwen2"), tmp_path).eval()
    with torch.no_grad():
        loaded_out = loaded(input_ids=ids).logits
    assert torch.equal(loaded_out, unpatched_out)
    assert _rel(patched_out, loaded_out) < RTOL


def test_4bit_with_gradient_checkpointing_matches_peft():
    pytest.importorskip("bitsandbytes")
    ids = _ids()
    pm = _peft_model("llama", four_bit="nf4")
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want = loss_and_grads(pm, ids)
    fastlora.patch(pm)
    _assert_close(loss_and_grads(pm, ids), want)


def test_eval_generate_and_merge_after_unpatch():
    pm = _peft_model("llama", dropout=0.1)
    ids = _ids()[:1, :5]
    handle = fastlora.patch(pm)
    pm.eval()
    with torch.no_grad():
        out = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and handle.report()["fallback_calls"] == {}
    handle.unpatch()
    with torch.no_grad():
        assert torch.equal(pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False), out)
        want = pm(input_ids=ids).logits
        merged = pm.merge_and_unload()
        assert _rel(merged(input_ids=ids).logits, want) < RTOL


def test_trainable_base_weight_is_not_accelerated():
    """fastlora never computes the base weight's gradient: such layers are skipped at patch time and a
    weight made trainable afterwards sends its layer's calls to PEFT's forward."""
    pm = _peft_model("llama")
    layers = list(_lora_layers(pm).values())
    layers[0].get_base_layer().weight.requires_grad_(True)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 13 and list(handle.skipped.values()) == [
        "q_proj: base weight is trainable (fastlora keeps it frozen)",  # its q/k/v group
        "base weight is trainable (fastlora keeps it frozen)"]
    layers[1].get_base_layer().weight.requires_grad_(True)
    ids = _ids()
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert layers[1].get_base_layer().weight.grad is not None
    assert list(handle.report()["fallback_calls"].values()) == [1]


def test_modules_to_save_keeps_working():
    model = _base("llama")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["lm_head"])
    pm = peft.get_peft_model(model, config).train()
    ids = _ids()
    want = loss_and_grads(pm, ids)
    assert any("lm_head" in name for name in want[1])
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14 and not handle.skipped
    _assert_close(loss_and_grads(pm, ids), want)


def test_patched_layers_follow_set_adapter():
    """Two adapters loaded, one active at a time: a patched layer computes whichever is active, fused."""
    pm = _peft_model("llama")
    ids = _ids()
    pm.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in pm.named_parameters():
        if "lora_B.second" in name:
            torch.nn.init.normal_(p, std=0.05)
    pm.base_model.set_adapter("second")
    want_second = loss_and_grads(pm, ids)
    pm.base_model.set_adapter("default")
    want_default = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    assert _n_lora(handle) == 14
    _assert_close(loss_and_grads(pm, ids), want_default)
    pm.base_model.set_adapter("second")
    _assert_close(loss_and_grads(pm, ids), want_second)
    pm.base_model.set_adapter("default")
    _assert_close(loss_and_grads(pm, ids), want_default)
    assert handle.report()["fallback_calls"] == {}


def test_patched_models_pickle_and_deepcopy(tmp_path):
    """torch.save of a whole patched model (PEFT, lora=, quantize=, NEFTune per_sequence) loads back patched,
    computing the same; its handle still unpatches the loaded copy."""
    from model_zoo import tiny_model

    ids = _ids()
    pm = _peft_model("llama")
    plain = tiny_model("llama")
    fastlora.patch(pm)
    fastlora.patch(plain, lora={"r": 4}, quantize="nf4", neftune_alpha=5.0, neftune_mode="per_sequence")
    for model in (pm, plain):
        model.eval()
        path = tmp_path / "model.pt"
        torch.save(model, path)
        loaded = torch.load(path, weights_only=False)
        for twin in (loaded, copy.deepcopy(model)):
            assert "fastlora(" in repr(twin) or "fastlora." in repr(twin)
            with torch.no_grad():
                assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
        assert fastlora.unpatch(loaded)
        text = repr(loaded)  # fastlora's 4-bit layers (quantize=) stay; nothing else of fastlora does
        assert "fastlora(" not in text and "fastlora.neftune" not in text and "lora(r=" not in text
        assert not loaded._forward_pre_hooks


def test_unexpected_fallbacks_warn_once_with_the_reason():
    """Adapters made bf16 while the hidden states stay fp32: every call falls back to PEFT; the user is told
    why, once; an expected fallback (adapters disabled) stays silent."""
    pm = _peft_model("llama")
    handle = fastlora.patch(pm)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    ids = _ids()
    sys.modules["fastlora.modules.peft_lora"].WARNED_FALLBACKS.clear()
    with pytest.warns(RuntimeWarning, match="adapters are torch.bfloat16") as record:
        pm(input_ids=ids)
    assert len([w for w in record if "adapters are" in str(w.message)]) == 1
    assert len(handle.report()["fallback_calls"]) == 14 + 2 + 2  # LoRA layers, fused MLP blocks, q/k/v groups
    with pm.disable_adapter(), warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(input_ids=ids)


@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["lora.bnb.Linear4bit", "lora.Linear-over-4bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_hidden_states_into_bf16_compute_layers(loaded_in_4bit, dropout):
    """prepare_model_for_kbit_training on a bf16-compute QLoRA model: fp32 hidden states enter bitsandbytes
    layers that compute in bf16. fastlora runs the base like bitsandbytes (x cast to bf16, linear_4bit) and the
    LoRA term on the fp32 x (lora_branch), with no fallback, the gated MLPs fused; with dropout 0 it equals PEFT,
    and with dropout the cpp and reference backends agree (fastlora's masks)."""
    def model():
        pm = _peft_model("llama", four_bit="nf4", loaded_in_4bit=loaded_in_4bit, dropout=dropout)
        for m in pm.modules():
            if hasattr(m, "compute_dtype"):
                m.compute_dtype = torch.bfloat16
        return pm

    ids = _ids()
    pm = model()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm, backend="cpp")
    torch.manual_seed(4)
    got = loss_and_grads(pm, ids)
    assert handle.report()["fallback_calls"] == {}
    assert handle.report()["kinds"]["base_model.model.model.layers.0.mlp"] == "gated MLP"
    if dropout == 0.0:
        # the base products are bitsandbytes' bf16 GEMMs on both sides; the LoRA terms fp32
        _assert_close(got, want, rtol=1e-5)
    else:
        ref = model()
        fastlora.patch(ref, backend="reference")
        torch.manual_seed(4)
        _assert_close(got, loss_and_grads(ref, ids), rtol=1e-5)


def test_4bit_weights_replaced_after_patching_are_followed():
    """A patched layer keeps a view of its bitsandbytes weight between calls (fastlora.modules._bnb); a weight
    replaced after patching (a new Params4bit, or new packed data and quant state on the same one) is what the
    next call computes with, as the unpatched model's layers do."""
    pytest.importorskip("bitsandbytes")
    pm = _peft_model("llama", four_bit="nf4")
    ids = _ids()
    handle = fastlora.patch(pm)
    loss_and_grads(pm, ids)  # the views are built
    attention = pm.base_model.model.model.layers[0].self_attn
    torch.manual_seed(7)
    # q_proj runs in the grouped q/k/v op, o_proj alone: a new Params4bit object for each
    for proj in (attention.q_proj, attention.o_proj):
        base = proj.base_layer
        base.weight = nf4.to_bnb(nf4.quantize(torch.randn(base.out_features, base.in_features) * 0.05, 64, "nf4", True))
    # the same Params4bit with other packed bytes and another quant state
    up = pm.base_model.model.model.layers[1].mlp.up_proj.base_layer
    other = nf4.to_bnb(nf4.quantize(torch.randn(up.out_features, up.in_features) * 0.05, 64, "nf4", True))
    up.weight.data, up.weight.quant_state = other.data, other.quant_state
    got = loss_and_grads(pm, ids)
    unpatched = copy.deepcopy(pm)
    assert fastlora.unpatch(unpatched)
    _assert_close(got, loss_and_grads(unpatched, ids))
    assert handle.report()["fallback_calls"] == {}
