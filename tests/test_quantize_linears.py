"""fastlora.modules.linear4bit: Linear4bit and quantize_linears on tiny random Hugging Face models.
A quantized model computes what the same model with bitsandbytes Linear4bit layers holding the same
codes computes; state dicts interoperate with bitsandbytes both ways; dtype casts leave the codes
alone; quantize_linears is all-or-nothing and reports bad input."""

import copy
import json

import pytest
import torch
from lora_cases import loss_and_grads

from fastlora import nf4
from fastlora.modules.linear4bit import Linear4bit, quantize_linears

transformers = pytest.importorskip("transformers")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96
RTOL = 1e-5  # fp32 gradients: bitsandbytes sums the bias gradient in another order


def _base(family: str = "llama"):
    # in_features multiples of the blocksize 64: bitsandbytes 0.50's native CPU dequantization is wrong
    # otherwise (README, "Known differences").
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).train()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).train()  # q/k/v have a bias


def _ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _bnb_twin(model, quantized):
    """A copy of the dense ``model`` whose linears named in ``quantized`` (a quantize_linears'd model) are
    bitsandbytes Linear4bit layers holding the very same codes and statistics."""
    bnb = pytest.importorskip("bitsandbytes")
    twin = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        q = module.quantized_weight()
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type=q.quant_type,
                                  compress_statistics=q.double_quant)
        layer.weight = nf4.to_bnb(q)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.detach().clone())
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, layer.train())
    return twin


def _assert_same_step(got, want):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    assert torch.equal(loss_g, loss_w)  # same decoded weights, same GEMMs
    assert grads_g.keys() == grads_w.keys() and grads_w
    for name in grads_w:
        assert _rel(grads_g[name], grads_w[name]) < RTOL, name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bitsandbytes_model(family, quant_type):
    base = _base(family)
    model = copy.deepcopy(base)
    names = quantize_linears(model, quant_type=quant_type, double_quant=quant_type == "nf4")
    assert sorted(names) == sorted(f"model.layers.{i}.{part}.{p}" for i in range(2) for p in PROJ
                                   for part in ("self_attn", "mlp") if (p in PROJ[:4]) == (part == "self_attn"))
    assert type(model.lm_head) is torch.nn.Linear  # skipped by default
    if family == "qwen2":  # the bias parameters were kept, as the same objects: BitFit trains them
        assert model.model.layers[0].self_attn.q_proj.bias.requires_grad
    ids = _ids()
    _assert_same_step(loss_and_grads(model, ids), loss_and_grads(_bnb_twin(base, model), ids))


def _weight_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for b, t in m.named_buffers(recurse=False) if t is not None}


def test_state_dict_is_bitsandbytes_format_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    base = _base("qwen2")
    model = copy.deepcopy(base)
    quantize_linears(model, quant_type="nf4", double_quant=True)
    twin = _bnb_twin(base, model)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if ".quant_state.bitsandbytes__" in key:
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(value.tolist())), key
        else:
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    ids = _ids()
    want = loss_and_grads(twin, ids)

    # bitsandbytes -> fastlora: a quantized model of other weights loads bitsandbytes' state dict (strict).
    other = _base("qwen2")
    torch.nn.init.normal_(other.model.embed_tokens.weight)
    quantize_linears(other, quant_type="fp4", double_quant=False)
    result = other.load_state_dict(theirs)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_step(loss_and_grads(other, ids), want)

    # fastlora -> bitsandbytes: rebuilt from our entries the way transformers loads a pre-quantized
    # checkpoint (bitsandbytes' Linear4bit.load_state_dict cannot load quantized entries at all).
    rebuilt = _bnb_twin(base, model)
    for name, module in rebuilt.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            head = f"{name}.weight"
            stats = {k[len(head) + 1:]: v for k, v in ours.items() if k.startswith(head + ".")}
            module.weight = bnb.nn.Params4bit.from_prequantized(ours[head], stats, device="cpu")
    dense = {k: v for k, v in ours.items() if not any(k.startswith(f"{n}.weight") for n, m in
                                                       rebuilt.named_modules() if isinstance(m, bnb.nn.Linear4bit))}
    rebuilt.load_state_dict(dense, strict=False)
    _assert_same_step(loss_and_grads(rebuilt, ids), want)


def test_dtype_casts_keep_the_codes():
    model = _base("llama")
    quantize_linears(model)
    ids = _ids()
    loss32 = model(input_ids=ids, labels=ids).loss.detach()
    before = _weight_buffers(model)
    model.to(torch.bfloat16)
    after = _weight_buffers(model)
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert _rel(out.loss.float(), loss32) < 2e-2  # bf16 activations
    model.double()
    model.to("cpu")
    assert all(torch.equal(t, before[k]) for k, t in _weight_buffers(model).items())
    assert _rel(model(input_ids=ids, labels=ids).loss.float(), loss32) < 1e-5


def test_module_contract():
    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 64)
    layer = Linear4bit.from_linear(linear, quant_type="fp4", blocksize=128, double_quant=False)
    assert layer.bias is linear.bias and layer.bias.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert (layer.in_features, layer.out_features, layer.quant_type) == (128, 64, "fp4")
    assert "fastlora 4-bit fp4" in repr(layer)
    layer.requires_grad_(True)  # the packed codes are not parameters: nothing to refuse
    q = layer.quantized_weight()
    assert q.packed.data_ptr() == layer.weight.data_ptr() and q.blocksize == 128 and not q.double_quant
    x = torch.randn(5, 128)
    want = torch.nn.functional.linear(x, nf4.dequantize(q, torch.float32), linear.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    # a bias of another dtype is cast for the call, not modified
    assert torch.equal(layer(x.double()), torch.nn.functional.linear(
        x.double(), nf4.dequantize(q, torch.float32).double(), linear.bias.double()))
    assert linear.bias.dtype == torch.float32
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x)) and twin.weight.data_ptr() != layer.weight.data_ptr()
    # a device move with a dtype: the weight's tensors move and keep their dtypes, the bias is cast
    moved = twin.to("meta", torch.bfloat16)
    assert moved.weight.device.type == "meta" and moved.weight.dtype == torch.uint8
    assert moved.weight_absmax.device.type == "meta" and moved.weight_absmax.dtype == torch.float32
    assert moved.bias.device.type == "meta" and moved.bias.dtype == torch.bfloat16


def test_load_state_dict_errors():
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64))
    wrong = Linear4bit.from_linear(torch.nn.Linear(64, 64)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(wrong)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict({"bias": torch.zeros(64)})
    sd = layer.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="not a 4-bit weight"):
        layer.load_state_dict(sd)


def test_all_or_nothing():
    model = _base("llama")
    before = dict(model.named_modules())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*finite"):
        quantize_linears(model)
    assert dict(model.named_modules()) == before
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_target_modules_and_errors():
    model = _base("llama")
    assert quantize_linears(model, target_modules=["q_proj"], double_quant=False) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        quantize_linears(model, target_modules=["nope"])
    with pytest.raises(TypeError, match="self_attn.*only torch.nn.Linear"):
        quantize_linears(model, target_modules=["self_attn"])
    with pytest.raises(TypeError, match="q_proj.*only torch.nn.Linear"):  # already quantized
        quantize_linears(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_modules must be"):
        quantize_linears(model, target_modules="q_proj")
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linears(model, quant_type="int4")
    with pytest.raises(TypeError, match="model must be"):
        quantize_linears("model")
    assert quantize_linears(model, skip=("lm_head", "mlp")) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj", "o_proj")]


def test_peft_adapters_stay_dense():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_base("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = quantize_linears(pm)
    assert all("lora_" not in n for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]) is torch.nn.Linear
    ids = _ids()
    loss, grads = loss_and_grads(pm, ids)
    assert torch.isfinite(loss) and grads and all("lora_" in n for n in grads)


def test_gradient_checkpointing_gives_the_same_step():
    """BitFit-style step (biases, norms, embeddings trainable) with and without checkpointing."""
    model = _base("qwen2")
    quantize_linears(model)
    ids = _ids()
    want = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same_step(loss_and_grads(model, ids), want)
