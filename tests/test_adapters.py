"""fastlora's own LoRA (fastlora.modules.lora, fastlora.adapters) on tiny random Llama models, against PEFT:
same targets, same initialisation, same loss and gradients for identical weights (dense fp32, bf16 base with
fp32 adapters, nf4 double-quant bitsandbytes base, rsLoRA, dropout), PEFT-format save/load both ways,
bit-exact removal, deepcopy, training, and bad input that names the problem and leaves the model untouched."""

import copy
import json
import math

import pytest
import torch
from lora_cases import loss_and_grads

from fastlora import adapters, nf4
from fastlora.adapters import LoraConfig
from fastlora.modules import lora as lora_mod

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96
RTOL = 1e-5  # fp32: PEFT's three GEMMs and fastlora's fused ones sum in other orders
PREFIX = "base_model.model."


def _base(bias=False):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=bias)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def _to_4bit(model):
    """The projections become bitsandbytes Linear4bit (nf4 double quant) holding fastlora.nf4.quantize'd
    weights; ``is_loaded_in_4bit`` makes PEFT build lora.bnb.Linear4bit, as for a load_in_4bit model."""
    bnb = pytest.importorskip("bitsandbytes")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is torch.nn.Linear:
                q = nf4.quantize(child.weight.detach(), 64, "nf4", True)
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                new.weight = nf4.to_bnb(q)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, child_name, new)
    model.is_loaded_in_4bit = True
    return model


def _no_bnb_cpu_repack(model):
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit in eval/no-grad repacks its weight and runs a kernel
    of its own that is not fp32-exact (DESIGN.md §2): keep the reference on bitsandbytes' fp32 path."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _peft_name(name):
    """PEFT parameter name -> fastlora's: no wrapper prefix, no adapter name."""
    return name.removeprefix(PREFIX).replace(".default.", ".")


def _pair(base, *, r=8, alpha=16, dropout=0.0, rslora=False, targets=TARGETS, seed=1, backend="auto"):
    """(PEFT model, fastlora model) over copies of ``base`` with identical, non-zero adapters."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora))
    torch.manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # PEFT's zero B would hide the LoRA branch
            torch.nn.init.normal_(p, std=0.05)
    fm = copy.deepcopy(base)
    adapters.add_lora(fm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                     use_rslora=rslora, task_type=None), backend=backend)
    fparams = dict(fm.named_parameters())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                fparams[_peft_name(name)].copy_(p)
    return pm.train(), fm.train()


def _assert_close(got, want, rtol=RTOL):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    grads_w = {_peft_name(n): g for n, g in grads_w.items()}
    assert _rel(loss_g, loss_w) < rtol, (loss_g, loss_w)
    assert grads_g.keys() == grads_w.keys() and len(grads_w) == 2 * 2 * len(TARGETS)
    for name in grads_w:
        assert _rel(grads_g[name], grads_w[name]) < rtol, name


def _no_fallbacks(model):
    mods = adapters.lora_modules(model)
    assert mods and all(lora_mod.fallback_calls(m) == 0 for m in mods.values())


def _peft_targets(model, config):
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    return sorted(n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


# ---------------------------------------------------------------------------------------------------------
# parity with PEFT


@pytest.mark.parametrize("rslora, bias", [(False, False), (True, True)], ids=["lora", "rslora-bias"])
def test_dense_fp32_matches_peft(rslora, bias):
    pm, fm = _pair(_base(bias), rslora=rslora, r=4, alpha=12)
    ids = _ids()
    _assert_close(loss_and_grads(fm, ids), loss_and_grads(pm, ids))
    _no_fallbacks(fm)
    # Only the adapters train, as with get_peft_model.
    assert {n for n, p in fm.named_parameters() if p.requires_grad} == {
        _peft_name(n) for n, p in pm.named_parameters() if p.requires_grad}


def test_bf16_base_with_fp32_adapters_matches_peft():
    pm, fm = _pair(_base().to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in fm.parameters() if p.requires_grad)
    ids = _ids()
    _assert_close(loss_and_grads(fm, ids), loss_and_grads(pm, ids), rtol=3e-2)  # bf16 activations, as test_patch
    _no_fallbacks(fm)


def test_4bit_bnb_base_matches_peft_bnb_linear4bit():
    from peft.tuners.lora import bnb as lora_bnb

    pm, fm = _pair(_to_4bit(_base()))
    assert sum(type(m) is lora_bnb.Linear4bit for m in pm.modules()) == 14
    assert all(lora_mod.lora_settings(m).rounding == "linear4bit" for m in adapters.lora_modules(fm).values())
    ids = _ids()
    _assert_close(loss_and_grads(fm, ids), loss_and_grads(pm, ids))
    _no_fallbacks(fm)


def test_dropout_is_active_in_training_only():
    pm, fm = _pair(_base(), dropout=0.1)
    ids = _ids()
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        got = fm.eval()(input_ids=ids).logits
    assert _rel(got, want) < RTOL
    fm.train()
    _, ref = _pair(_base(), dropout=0.1, backend="reference")  # same weights and Philox masks, torch backend
    assert lora_mod.lora_settings(ref.get_submodule("model.layers.0.mlp.up_proj")).backend == "reference"
    got_train, ref_train = loss_and_grads(fm, ids), loss_and_grads(ref, ids)
    assert _rel(got_train[0], ref_train[0]) < 1e-5
    for name in ref_train[1]:
        assert _rel(got_train[1][name], ref_train[1][name]) < 1e-4, name
    # Dropout changes the training loss against the dropout-free eval loss of the same model.
    with torch.no_grad():
        eval_loss = fm.eval()(input_ids=ids, labels=ids).loss
    assert abs(eval_loss.item() - got_train[0].item()) > 1e-6


@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj"], "all-linear", r".*\.0\.self_attn\.(q|k)_proj",
                                     ["self_attn.o_proj", "model.layers.1.mlp.up_proj"]])
@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
def test_targets_match_peft(targets, four_bit):
    base = _to_4bit(_base()) if four_bit else _base()
    config = LoraConfig(target_modules=targets)
    want = _peft_targets(base, peft.LoraConfig(r=8, target_modules=targets))
    assert sorted(adapters.select_targets(base, config)) == want and want
    assert "lm_head" not in want
    assert sorted(adapters.add_lora(base, config)) == want


def test_same_seed_gives_peft_initialisation():
    base = _base()
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    fm = copy.deepcopy(base)
    torch.manual_seed(3)
    adapters.add_lora(fm, LoraConfig())
    fparams = dict(fm.named_parameters())
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(lora) == 28
    for name, p in lora.items():
        assert torch.equal(fparams[_peft_name(name)], p), name
    assert all(not torch.any(p) for n, p in fparams.items() if "lora_B" in n)


def test_module_level_odd_shapes_and_dtype_rules():
    torch.manual_seed(4)
    lin = torch.nn.Linear(37, 23).requires_grad_(False)
    x = torch.randn(3, 5, 37)
    want_base = lin(x)
    lora_mod.attach_lora(lin, r=3, lora_alpha=5, use_rslora=True)
    s = lora_mod.lora_settings(lin)
    assert (s.r, s.lora_alpha, s.lora_dropout, s.use_rslora) == (3, 5, 0.0, True)
    assert math.isclose(s.scaling, 5 / math.sqrt(3))
    assert _rel(lin(x), want_base) < 2e-6  # B starts at zero (the fused GEMM sums in another order)
    torch.nn.init.normal_(lin.lora_B.weight)
    y = lin(x)
    x64 = x.double()
    want = (x64 @ lin.weight.double().T + lin.bias.double()
            + s.scaling * (x64 @ lin.lora_A.weight.double().T) @ lin.lora_B.weight.double().T)
    assert _rel(y, want) < 2e-6 and y.shape == (3, 5, 23)
    assert lora_mod.fallback_calls(lin) == 0
    # Autocast: fused, in the autocast dtype (tests/test_autocast.py compares it with PEFT's layers).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = lin(x)
    assert lora_mod.fallback_calls(lin) == 0 and y_ac.dtype == torch.bfloat16
    assert _rel(y_ac, want) < 4 * 2.0**-8
    # F.linear (and PEFT) cannot mix dtypes on a dense base: a clear error, not a silent cast.
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the base layer has weight torch.float32"):
        lin(x.bfloat16())
    # A trainable base weight gets its gradient from PEFT's formula (the fused op never computes it).
    lin.weight.requires_grad_(True)
    lin(x).sum().backward()
    assert lora_mod.fallback_calls(lin) == 1
    assert torch.allclose(lin.weight.grad, x.reshape(-1, 37).sum(0).expand(23, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    assert lora_mod.fallback_calls(lin) == 2  # under autocast too
    assert repr(lin).startswith("Linear(\n  in_features=37, out_features=23, bias=True, lora(r=3, alpha=5, "
                                "dropout=0.0, rslora)\n  (lora_A): Linear(in_features=37, out_features=3, bias=False)")
    # Ranks above the fused op's limit run PEFT's formula.
    wide = torch.nn.Linear(8, 4).requires_grad_(False)
    lora_mod.attach_lora(wide, r=lora_mod.MAX_RANK + 1, lora_alpha=1)
    torch.nn.init.normal_(wide.lora_B.weight)
    x8 = torch.randn(2, 8)
    want = wide.weight @ x8.T + wide.bias[:, None] + (wide.lora_B.weight @ (wide.lora_A.weight @ x8.T)) / 257
    assert _rel(wide(x8), want.T) < 1e-5 and lora_mod.fallback_calls(wide) == 1


def test_quantized_weight_module_matches_bnb_base():
    """A module with quantized_weight() (fastlora's own 4-bit linear, duck-typed) computes what the same
    weight in a bitsandbytes Linear4bit computes."""
    bnb = pytest.importorskip("bitsandbytes")

    class Quantized4bit(torch.nn.Module):
        def __init__(self, q, bias):
            super().__init__()
            self.q, self.bias = q, bias
            self.out_features, self.in_features = q.shape

        def quantized_weight(self):
            return self.q

        def forward(self, x):
            return torch.nn.functional.linear(x, nf4.dequantize(self.q, x.dtype), self.bias)

    torch.manual_seed(6)
    q = nf4.quantize(torch.randn(48, 128) / 11, 64, "nf4", True)
    bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    own = Quantized4bit(q, bias)
    ref = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type="nf4")
    ref.weight, ref.bias = nf4.to_bnb(q), torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    for m in (own, ref):
        torch.manual_seed(9)
        lora_mod.attach_lora(m, r=5, lora_alpha=7)
        torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(7, 128, requires_grad=True)
    y_own, y_ref = own(x), ref(x)
    assert _rel(y_own, y_ref) < 2e-6
    g = torch.randn_like(y_own)
    grads = [torch.autograd.grad(y, (x, m.lora_A.weight, m.lora_B.weight), g) for y, m in ((y_own, own), (y_ref, ref))]
    for a, b in zip(*grads, strict=True):
        assert _rel(a, b) < 2e-6
    assert lora_mod.fallback_calls(own) == 0 and lora_mod.fallback_calls(ref) == 0


def test_fallback_calls_compute_what_peft_computes():
    """Calls the fused op cannot take (a trainable base weight, under autocast as well; a 4-bit layer whose
    bitsandbytes compute dtype is not x's) run PEFT's own formula: bit-identical to PEFT's layers. Autocast
    calls are otherwise fused (tests/test_autocast.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(8)
    four = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    four.weight = nf4.to_bnb(nf4.quantize(torch.randn(32, 64) / 8, 64, "nf4", True))
    seq = torch.nn.Sequential(torch.nn.Linear(64, 32).requires_grad_(False), four)
    seq.is_loaded_in_4bit = True
    pm = peft.get_peft_model(copy.deepcopy(seq), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"]))
    fm = copy.deepcopy(seq)
    adapters.add_lora(fm, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], task_type=None))
    fparams = dict(fm.named_parameters())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p)
                fparams[_peft_name(name)].copy_(p)
    peft_dense, peft_four = pm.base_model.model[0], pm.base_model.model[1]
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fm[0](x), peft_dense(x)
    assert got.dtype == want.dtype == torch.bfloat16 and _rel(got, want) < 4 * 2.0**-8
    assert lora_mod.fallback_calls(fm[0]) == 0
    fm[0].weight.requires_grad_(True)
    peft_dense.base_layer.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fm[0](x), peft_dense(x))
    assert lora_mod.fallback_calls(fm[0]) == 1
    # The first fp32 call fixes bitsandbytes' compute dtype to fp32 (fused here), a bf16 call then differs.
    assert _rel(fm[1](x), peft_four(x)) < 2e-6 and fm[1].compute_type_is_set
    assert lora_mod.fallback_calls(fm[1]) == 0
    assert torch.equal(fm[1](x.bfloat16()), peft_four(x.bfloat16()))
    assert lora_mod.fallback_calls(fm[1]) == 1


# ---------------------------------------------------------------------------------------------------------
# PEFT-format files


def test_save_from_fastlora_loads_in_peft(tmp_path):
    pm, fm = _pair(_base(), dropout=0.05, rslora=True, r=4, alpha=8)
    ids = _ids()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=TARGETS, use_rslora=True)
    adapters.save_adapter(fm, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(TARGETS) and saved["task_type"] == "CAUSAL_LM"
    pconfig = peft.PeftConfig.from_pretrained(tmp_path)
    assert (pconfig.r, pconfig.lora_alpha, pconfig.lora_dropout, pconfig.use_rslora) == (4, 8, 0.05, True)
    sd = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    assert len(sd) == 28 and all(k.startswith(PREFIX) and t.is_contiguous() for k, t in sd.items())
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, fm.eval()(input_ids=ids).logits
        assert _rel(got, want) < RTOL
        assert torch.equal(got, pm.eval()(input_ids=ids).logits)  # PEFT holds exactly the saved weights


def test_save_without_config_lists_full_names(tmp_path):
    fm = _base()
    adapters.add_lora(fm, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    adapters.save_adapter(fm, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(adapters.lora_modules(fm))
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in loaded.modules()) == 14
    # A config whose targets select exactly the adapted modules is written as given.
    adapters.save_adapter(fm, tmp_path, LoraConfig(r=2, lora_alpha=4))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "all-linear"
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in loaded.modules()) == 14
    with pytest.raises(ValueError, match="config.r = 8 but the model's adapters have 2"):
        adapters.save_adapter(fm, tmp_path, LoraConfig(lora_alpha=4))


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
def test_save_from_peft_loads_in_fastlora(tmp_path, four_bit):
    base = _to_4bit(_base()) if four_bit else _base()
    pm, _ = _pair(base, r=4, alpha=8, dropout=0.1, targets="all-linear")
    pm.save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    names = adapters.load_adapter(fresh, tmp_path)
    assert len(names) == 14
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(fresh.get_parameter(_peft_name(n)), p), n
    s = lora_mod.lora_settings(fresh.get_submodule(names[0]))
    assert (s.r, s.lora_alpha, s.lora_dropout) == (4, 8, 0.1)
    ids = _ids()
    _no_bnb_cpu_repack(pm)
    with torch.no_grad():
        assert _rel(fresh.eval()(input_ids=ids).logits, pm.eval()(input_ids=ids).logits) < RTOL
    _no_fallbacks(fresh)


def test_load_accepts_peft_bin_files(tmp_path):
    pm, fm = _pair(_base(), r=4, alpha=8, targets=["q_proj", "v_proj"])
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    fresh = _base()
    assert len(adapters.load_adapter(fresh, tmp_path)) == 4
    for name, m in adapters.lora_modules(fresh).items():
        assert torch.equal(m.lora_A.weight, fm.get_submodule(name).lora_A.weight)
        assert torch.equal(m.lora_B.weight, fm.get_submodule(name).lora_B.weight)


def test_load_accepts_adapter_name_in_keys(tmp_path):
    pm, fm = _pair(_base(), r=4, alpha=8)
    adapters.save_adapter(fm, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = safetensors_torch.load_file(path)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    safetensors_torch.save_file(renamed, path)
    fresh = _base()
    adapters.load_adapter(fresh, tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, fm(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------
# removal, copies, training


def test_remove_is_bit_exact_and_keeps_state():
    model = _base(bias=True)
    ids = _ids()
    before = loss_and_grads(model, ids)
    keys = list(model.state_dict().keys())
    params = {n: id(p) for n, p in model.named_parameters()}
    plain_repr = repr(model)
    names = adapters.add_lora(model, LoraConfig(r=4, lora_dropout=0.1), freeze_base=False)
    assert len(names) == 14 and "lora(r=4, alpha=16, dropout=0.1)" in repr(model)
    new_keys = set(model.state_dict()) - set(keys)
    assert new_keys == {f"{n}.lora_{p}.weight" for n in names for p in "AB"}
    for p in adapters.lora_modules(model).values():
        torch.nn.init.normal_(p.lora_B.weight)
    loss_and_grads(model, ids)
    assert sorted(adapters.remove_lora(model)) == sorted(names)
    assert adapters.remove_lora(model) == []
    assert list(model.state_dict().keys()) == keys and repr(model) == plain_repr
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert all("forward" not in m.__dict__ and lora_mod._STATE_ATTR not in m.__dict__ for m in model.modules())
    after = loss_and_grads(model, ids)
    assert torch.equal(before[0], after[0])
    for name in before[1]:
        assert torch.equal(before[1][name], after[1][name]), name


def test_deepcopy_of_a_lora_model():
    _, fm = _pair(_base(), r=4, alpha=8)
    twin = copy.deepcopy(fm)
    for name, m in adapters.lora_modules(twin).items():
        assert m.forward.__self__ is m and lora_mod.lora_settings(m) == lora_mod.lora_settings(fm.get_submodule(name))
    ids = _ids()
    got, want = loss_and_grads(twin, ids), loss_and_grads(fm, ids)
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys()
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    with torch.no_grad():
        twin.get_submodule("model.layers.0.self_attn.q_proj").lora_B.weight.zero_()
        assert not torch.equal(twin(input_ids=ids).logits, fm(input_ids=ids).logits)
        assert torch.equal(fm(input_ids=ids, labels=ids).loss, want[0])


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["hf-default", "non-reentrant"])
def test_gradient_checkpointing_repeats_dropout_masks(kwargs):
    _, fm = _pair(_base(), dropout=0.1)
    ids = _ids()
    plain = loss_and_grads(fm, ids)
    fm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    fm.enable_input_require_grads()
    ckpt = loss_and_grads(fm, ids)
    assert torch.equal(plain[0], ckpt[0]) and len(plain[1]) == 28
    for name in plain[1]:
        assert torch.equal(plain[1][name], ckpt[1][name]), name


def test_optimizer_over_lora_params_trains():
    model = _base()
    adapters.add_lora(model, LoraConfig(r=4, lora_alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 28
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive int"), (dict(r=2.0), "r must be a positive int"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules=""), "target_modules"),
    (dict(target_modules="("), "target_modules"), (dict(task_type="SEQ_CLS"), "task_type"),
])
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**kwargs)


def _untouched(model, keys):
    assert list(model.state_dict().keys()) == keys
    assert not adapters.lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_bad_add_leaves_model_untouched(monkeypatch):
    model = _base()
    keys = list(model.state_dict().keys())
    with pytest.raises(ValueError, match="'nonexistent_proj'.*matched no module"):
        adapters.add_lora(model, LoraConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="'model.embed_tokens' is a torch.nn.modules.sparse.Embedding"):
        adapters.add_lora(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="backend"):
        adapters.add_lora(model, LoraConfig(), backend="gpu")
    with pytest.raises(TypeError, match="config"):
        adapters.add_lora(model, {"r": 8})
    _untouched(model, keys)
    real, calls = lora_mod.attach_lora, []

    def failing(module, **kw):
        calls.append(module)
        if len(calls) == 5:
            raise RuntimeError("boom")
        real(module, **kw)

    monkeypatch.setattr(lora_mod, "attach_lora", failing)
    with pytest.raises(RuntimeError, match="boom"):
        adapters.add_lora(model, LoraConfig())
    _untouched(model, keys)
    monkeypatch.setattr(lora_mod, "attach_lora", real)
    adapters.add_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has a fastlora LoRA"):
        adapters.add_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT modules"):
        adapters.add_lora(peft.get_peft_model(_base(), peft.LoraConfig(target_modules=["v_proj"])), LoraConfig())


def test_attach_bad_input():
    with pytest.raises(TypeError, match="module must be a torch.nn.Linear"):
        lora_mod.attach_lora(torch.nn.Conv1d(4, 4, 1), r=2, lora_alpha=2)
    lin = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="dtype"):
        lora_mod.attach_lora(lin, r=2, lora_alpha=2, dtype=torch.int8)
    with pytest.raises(ValueError, match="no fastlora LoRA"):
        lora_mod.detach_lora(lin)
    assert not lora_mod.has_lora(lin) and lora_mod.lora_settings(lin) is None


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = _base()
    adapters.add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    adapters.save_adapter(model, path, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return path


def _copy_adapter(src, dst, config_edit=None, weights_edit=None):
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "adapter_config.json").read_text())
    sd = safetensors_torch.load_file(src / "adapter_model.safetensors")
    if config_edit:
        config_edit(config)
    if weights_edit:
        weights_edit(sd)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(sd, dst / "adapter_model.safetensors")
    return dst


Q0 = PREFIX + "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, match", [
    (dict(config_edit=lambda c: c.update(use_dora=True)), "'use_dora' = True"),
    (dict(config_edit=lambda c: c.update(fan_in_fan_out=True)), "'fan_in_fan_out'"),
    (dict(config_edit=lambda c: c.update(lora_bias=True)), "'lora_bias'"),
    (dict(config_edit=lambda c: c.update(rank_pattern={"q_proj": 2})), "'rank_pattern'"),
    (dict(config_edit=lambda c: c.update(alpha_pattern={"q_proj": 2})), "'alpha_pattern'"),
    (dict(config_edit=lambda c: c.update(bias="all")), "'bias' = 'all'"),
    (dict(config_edit=lambda c: c.update(layers_to_transform=0)), "'layers_to_transform' = 0"),
    (dict(config_edit=lambda c: c.update(modules_to_save=["lm_head"])), "'modules_to_save'"),
    (dict(config_edit=lambda c: c.update(init_lora_weights="pissa")), "'init_lora_weights' = 'pissa'"),
    (dict(config_edit=lambda c: c.update(peft_type="IA3")), "peft_type"),
    (dict(config_edit=lambda c: c.update(r=0)), "r must be a positive int"),
    (dict(weights_edit=lambda sd: sd.update({Q0 + ".lora_A.weight": torch.zeros(3, 64)})),
     r"q_proj.lora_A.weight has shape \(3, 64\), expected \(4, 64\)"),
    (dict(weights_edit=lambda sd: sd.pop(Q0 + ".lora_B.weight")), r"missing keys.*q_proj.lora_B.weight"),
    (dict(weights_edit=lambda sd: sd.update({PREFIX + "lm_head.lora_A.weight": torch.zeros(4, 64),
                                             PREFIX + "lm_head.lora_B.weight": torch.zeros(96, 4)})),
     r"unexpected keys.*lm_head.lora_A.weight \(not selected"),
    (dict(weights_edit=lambda sd: sd.update({PREFIX + "model.nope.lora_A.weight": torch.zeros(4, 64)})),
     r"unexpected keys.*model.nope.lora_A.weight \(no such module"),
    (dict(weights_edit=lambda sd: sd.update({Q0 + ".lora_magnitude_vector": torch.zeros(64)})),
     "unexpected key.*lora_magnitude_vector"),
])
def test_bad_adapter_folder(saved_adapter, tmp_path, edit, match):
    path = _copy_adapter(saved_adapter, tmp_path / "bad", **edit)
    model = _base()
    keys = list(model.state_dict().keys())
    with pytest.raises(ValueError, match=match):
        adapters.load_adapter(model, path)
    _untouched(model, keys)


def test_adapter_folder_missing_files(saved_adapter, tmp_path):
    model = _base()
    keys = list(model.state_dict().keys())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        adapters.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text((saved_adapter / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        adapters.load_adapter(model, tmp_path)
    _untouched(model, keys)
    # A module that already has LoRA is refused before anything is attached.
    adapters.add_lora(model, LoraConfig(target_modules=["model.layers.1.mlp.down_proj"]))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj' already has a fastlora LoRA"):
        adapters.load_adapter(model, saved_adapter)
    assert list(adapters.lora_modules(model)) == ["model.layers.1.mlp.down_proj"]


def test_config_round_trip():
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules={"v_proj", "q_proj"}, use_rslora=True)
    d = config.to_peft_dict("some/model")
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["base_model_name_or_path"] == "some/model"
    back = LoraConfig.from_peft_dict(d)
    assert (back.r, back.lora_alpha, back.lora_dropout, back.target_modules, back.use_rslora) == (
        16, 32, 0.05, ["q_proj", "v_proj"], True)
    peft_dict = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM").to_dict()
    assert LoraConfig.from_peft_dict(peft_dict).task_type == "CAUSAL_LM"
    assert peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"}).r == 16
