"""Formats as data (odd bit widths, GGUF grids, codebooks), the CPU kernels, GPTQ, AWQ, k-means, ternary and
mixed precision, on toy tensors and tiny random models."""

import copy

import pytest
import torch
from torch import nn

from conftest import make_model
from minigiant import artifact
from minigiant.config import from_dict
from minigiant.context import Context
from minigiant.data import sample_blocks
from minigiant.errors import ConfigError, DataError
from minigiant.quantize import QuantizeConfig, QuantLinear, quantize
from minigiant.quantize.awq import apply_scales, resolve_groups, search_scales
from minigiant.quantize.formats import FORMAT_PRESETS, WeightFormat, dequantize, grid, pack, quantize_rtn, unpack
from minigiant.quantize.gptq import gptq_quantize
from minigiant.quantize.kernels import best_kind, fits, runtime
from minigiant.quantize.kmeans import quantize_kmeans
from minigiant.quantize.serialization import load_packed
from minigiant.quantize.ternary import quantize_ternary

VOCAB = 256


def tiny(tie: bool = True, hidden: int = 64):
    return make_model(VOCAB, layers=2, tie=tie, hidden=hidden)


def ids(length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def restored(weight, fmt):
    return dequantize(quantize_rtn(weight, fmt), fmt, torch.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_unpack_round_trip_is_exact_at_every_width(bits):
    codes = torch.randint(0, 2**bits, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.shape == (3, 64 * bits // 8)  # exactly `bits` per weight
    assert torch.equal(unpack(packed, bits), codes)


def test_3bit_codes_straddle_bytes_little_endian():
    # codes 1..7,0 → bit stream 001 010 011 100 101 110 111 000 (first code lowest)
    value = sum(c << (3 * k) for k, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    expected = [(value >> (8 * j)) & 255 for j in range(3)]
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8), 3).tolist() == [expected]


FORMATS = [
    WeightFormat(8, 32, True), WeightFormat(6, 32, False), WeightFormat(5, 32, True, full_range=True),
    WeightFormat(4, 32, False), WeightFormat(4, 32, False, zero_point="float"), WeightFormat(3, 64, False),
    WeightFormat(2, 32, True), WeightFormat(4, 32, True, scale_dtype="bfloat16"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_error_is_within_half_a_step_of_each_group(fmt):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    scale, _ = grid(w.reshape(16, -1, fmt.group_size), fmt)
    error = (restored(w, fmt) - w).abs().reshape(16, -1, fmt.group_size)
    # Half a step, plus the float rounding of the stored scale (its dtype's epsilon times the largest code).
    slack = torch.finfo(fmt.torch_scale_dtype).eps * 2**fmt.bits * scale.abs()
    # llama.cpp's full-range grid puts the signed extreme on code -2**(bits-1); the other side reaches one
    # step less far, so a weight there may clamp by up to a whole step (as in Q4_0/Q5_0 themselves).
    bound = scale.abs() if fmt.full_range else scale.abs() / 2
    assert torch.all(error <= bound + slack)


def test_gguf_grids_match_llama_cpp_rules():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25] * 8])
    q4_0 = FORMAT_PRESETS["q4_0"]
    q = quantize_rtn(w, q4_0)
    assert float(q.scales[0, 0]) == pytest.approx(-2.0 / -8)  # d = signed extreme / -8
    codes = unpack(q.qweight, 4)
    assert codes.min() == 0 and codes.max() <= 15  # -8..7 around 8: the extreme -2.0 sits on code 0
    assert torch.equal(dequantize(q, q4_0, torch.float32), w)  # all values on the grid
    q4_1 = FORMAT_PRESETS["q4_1"]
    q = quantize_rtn(w, q4_1)
    assert q.zeros.dtype == torch.float16 and float(q.zeros[0, 0]) == -2.0  # the stored min
    assert float(q.scales[0, 0]) == pytest.approx(3.0 / 15, rel=1e-3)  # (max - min) / 15
    assert q4_1.storage_bits() == 5.0 and FORMAT_PRESETS["q8_0"].storage_bits() == 8.5  # as llama.cpp's types
    assert FORMAT_PRESETS["q4_0"].storage_bits() == 4.5 and FORMAT_PRESETS["q5_1"].storage_bits() == 6.0


KERNEL_CASES = [
    ("int4pack", QuantizeConfig(bits=4, group_size=32)),
    ("int4pack", QuantizeConfig(format="q4_0")),
    ("int4pack", QuantizeConfig(format="q4_1")),
    ("int4pack", QuantizeConfig(bits=3, group_size=32)),
    ("int4pack", QuantizeConfig(bits=3, group_size=64, symmetric=True)),
    ("int4pack", QuantizeConfig(bits=2, group_size=32)),
    ("int8pack", QuantizeConfig(bits=8, group_size=-1)),
    ("int8pack", QuantizeConfig(bits=8, group_size=-1, symmetric=True)),
    ("int8hilo", QuantizeConfig(bits=8, group_size=32)),
]
INT8_DYNAMIC_CASES = [QuantizeConfig(bits=8, group_size=-1), QuantizeConfig(bits=8, group_size=-1, symmetric=True)]


@pytest.mark.parametrize("kind,config", KERNEL_CASES, ids=lambda v: getattr(v, "format", None) or str(v))
def test_kernel_matmul_equals_the_reference_dequantized_matmul(kind, config):
    linear = nn.Linear(128, 96, bias=True)
    torch.manual_seed(0)
    model = nn.Sequential(linear)
    fmt = config.weight_format()
    fmt = WeightFormat(**{**fmt.__dict__, "group_size": 128 if fmt.group_size == -1 else fmt.group_size})
    q = QuantLinear.from_linear(linear, quantize_rtn(linear.weight, fmt), fmt)
    assert best_kind(q) == kind
    assert fits(kind, q)
    x = torch.randn(3, 128)
    reference = x @ q.dequantize(torch.float32).T + linear.bias
    with torch.no_grad(), runtime(kind):
        y = q(x)
    # bfloat16 activations, scales and zeros: the kernel's error is a bfloat16 rounding (2**-8 relative)
    # of each product, summed over 128 inputs; 1% of the output range bounds it with margin.
    assert y.dtype == torch.float32
    assert (y - reference).abs().max() <= 1e-2 * reference.abs().max()
    with torch.no_grad(), runtime("cached"):
        assert torch.equal(q(x), torch.nn.functional.linear(x, q.dequantize(torch.float32), linear.bias))
    del model


@pytest.mark.parametrize("config", INT8_DYNAMIC_CASES, ids=["asymmetric", "symmetric"])
def test_int8_dynamic_kernel_is_within_the_activation_rounding_bound(config):
    """fbgemm quantizes each call's activations to 7 bits (128 levels over [min(x, 0), max(x, 0)]); the weight
    codes are exact, so every output is off by at most half a step times the row's sum of |w|."""
    linear = nn.Linear(128, 96, bias=False)
    fmt = config.weight_format()
    fmt = WeightFormat(**{**fmt.__dict__, "group_size": 128})
    q = QuantLinear.from_linear(linear, quantize_rtn(linear.weight, fmt), fmt)
    with torch.no_grad():
        q.scales[5] = 0  # an all-zero row: fbgemm refuses scale 0, the runtime must still give zeros
        q.qweight[5] = q.qweight[5, 0] if config.symmetric else q.zeros[5, 0]
    assert fits("int8dynamic", q)
    x = torch.randn(1, 128)  # one decode token: one activation scale
    w = q.dequantize(torch.float32)
    reference = x @ w.T
    with torch.no_grad(), runtime("int8dynamic"):
        y = q(x)
    step = (x.max().clamp_min(0) - x.min().clamp_max(0)) / 127
    bound = step / 2 * w.abs().sum(1) + 1e-5
    assert (y - reference).abs()[0].le(bound).all()
    assert (y - reference).abs().max() > 0  # it really ran the integer path, not the float one
    assert y[0, 5] == 0


def test_auto_never_picks_int8_dynamic_but_it_can_be_forced():
    # auto stays weight-only, so the perplexity the quantize stage reports is what decoding gets
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=False)
    fmt = WeightFormat(**{**QuantizeConfig(bits=8, group_size=-1).weight_format().__dict__, "group_size": 128})
    q = QuantLinear.from_linear(linear, quantize_rtn(linear.weight, fmt), fmt)
    assert fits("int8dynamic", q) and best_kind(q) == "int8pack"
    x = torch.randn(1, 128)
    with torch.no_grad():
        weight_only = q(x)
        with runtime("int8dynamic"):
            dynamic = q(x)
    assert (weight_only - dynamic).abs().max() > 0  # the forced runtime really ran (7-bit activations)
    g32 = WeightFormat(**{**fmt.__dict__, "group_size": 32})
    assert not fits("int8dynamic", QuantLinear.from_linear(linear, quantize_rtn(linear.weight, g32), g32))


def test_decode_uses_the_kernel_and_prefill_the_float_path():
    model = quantize(tiny(), QuantizeConfig(bits=4, group_size=32))
    layer = model.model.layers[0].mlp.up_proj
    assert best_kind(layer) == "int4pack"
    with torch.no_grad():
        model(ids(4)[:1])  # 4 rows: kernel
        runner = layer.__dict__["_runner"]
        assert "int4pack" in runner.layouts
        assert model(ids(64)).logits.shape == (2, 64, VOCAB)  # 128 rows: float path, no new layout
        assert set(runner.layouts) == {"int4pack"}


def _calibration(cols: int, tokens: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, :4] *= 20  # a few outlier channels, as in real activations
    return x


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_is_below_rtn_on_the_same_calibration_data(act_order):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    x = _calibration(128)
    fmt = WeightFormat(4, 32, False)
    hessian = 2 * x.T @ x / x.shape[0]
    q_gptq = dequantize(gptq_quantize(w, hessian, fmt, act_order=act_order, block=32), fmt, torch.float32)
    q_rtn = restored(w, fmt)
    err_gptq = (x @ (w - q_gptq).T).pow(2).sum()
    err_rtn = (x @ (w - q_rtn).T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn


def test_awq_scaling_leaves_float_outputs_unchanged():
    model = tiny(tie=False)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        layer = model.model.layers[0]
        targets = {m: n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = resolve_groups(layer, targets)
        # norm → q/k/v, norm → gate/up, up → down (v → o is skipped: 2 KV heads feed 4 query heads)
        assert len(groups) == 3
        for i, (previous, linears) in enumerate(groups):
            apply_scales(previous, linears, torch.rand(linears[0].in_features, generator=torch.Generator().manual_seed(i)) * 3 + 0.2)
        after = model(x).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(layer.mlp.down_proj.weight, copy.deepcopy(tiny(tie=False)).model.layers[0].mlp.down_proj.weight)


def test_awq_error_is_at_most_rtn_error_on_calibration_data():
    linear = nn.Linear(128, 64, bias=False)
    x = _calibration(128)
    fmt = WeightFormat(4, 32, False)
    w = linear.weight.detach().clone()
    scales, _, _ = search_scales([linear], [fmt], x.T @ x / x.shape[0], x.abs().mean(0), grid=20)
    # The error measured directly on the activations (not through the Hessian the search used).
    awq_weight = restored(w * scales, fmt) / scales
    err_awq = (x @ (w - awq_weight).T).pow(2).sum()
    err_rtn = (x @ (w - restored(w, fmt)).T).pow(2).sum()
    assert err_awq < err_rtn


@pytest.mark.parametrize("codebook", ["group", "tensor"])
def test_kmeans_reproduces_a_weight_of_2_to_the_bits_values_exactly(codebook):
    values = torch.tensor([-1.5, -1.0, -0.75, -0.5, -0.25, -0.125, 0.0, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.25, 2.0])
    w = values[torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0))]
    w[:, :16] = values  # every row holds all 16 values
    fmt = WeightFormat(4, 64, True, codebook=codebook)
    q = quantize_kmeans(w, fmt)
    assert q.codebook.shape == ((32, 1, 16) if codebook == "group" else (1, 1, 16))
    assert torch.equal(dequantize(q, fmt, torch.float32), w)


def test_weighted_kmeans_serves_the_high_energy_column_and_lowers_the_weighted_error():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    energy = torch.ones(64)
    energy[5] = 1e4  # one outlier input channel: its weights' errors dominate the layer's output error
    fmt = WeightFormat(2, 64, True, codebook="group")
    plain = dequantize(quantize_kmeans(w, fmt), fmt, torch.float32)
    weighted = dequantize(quantize_kmeans(w, fmt, energy), fmt, torch.float32)

    def output_error(q):
        return float(((w - q) ** 2 * energy).sum())

    assert (weighted[:, 5] - w[:, 5]).abs().max() < 0.01  # each row's outlier-channel weight gets its own entry
    assert (plain[:, 5] - w[:, 5]).abs().max() > 0.1
    assert output_error(weighted) < 0.5 * output_error(plain)
    assert torch.equal(dequantize(quantize_kmeans(w, fmt, torch.ones(64)), fmt, torch.float32), plain)  # weights of 1: plain k-means


def test_ternary_weights_take_three_values_per_group_and_exact_ternary_is_exact():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    fmt = WeightFormat(2, 32, True)
    out = dequantize(quantize_ternary(w, fmt), fmt, torch.float32).reshape(8, 2, 32)
    for group in out.reshape(-1, 32):
        assert len(set(group.abs().tolist()) - {0.0}) == 1
    exact = torch.tensor([-0.5, 0.0, 0.5, 0.5]).repeat(8, 16)
    assert torch.equal(dequantize(quantize_ternary(exact, fmt), fmt, torch.float32), exact)


@pytest.mark.parametrize("config", [
    QuantizeConfig(bits=3, group_size=32), QuantizeConfig(bits=6, group_size=32, symmetric=True),
    QuantizeConfig(format="q4_1"), QuantizeConfig(format="q5_0"), QuantizeConfig(method="kmeans", bits=3, group_size=-1),
    QuantizeConfig(method="kmeans", bits=2, codebook="tensor"), QuantizeConfig(method="ternary", bits=2),
    QuantizeConfig(method="binary", bits=1), QuantizeConfig(bits=4, scale_dtype="bfloat16"),
], ids=lambda c: f"{c.method}-{c.format or c.bits}")
def test_every_format_saves_and_reloads_bit_exact(tmp_path, config):
    model = quantize(tiny(), config)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        artifact.save(model, None, tmp_path / "q")
        reloaded = load_packed(tmp_path / "q", artifact.read_lineage(tmp_path / "q"))
        assert torch.equal(reloaded(x).logits, expected)
        decode_before = model(x[:, :3]).logits
        assert torch.equal(reloaded(x[:, :3]).logits, decode_before)  # the kernel/cached path too


def test_gptq_and_awq_run_on_a_model_and_need_enough_calibration(tokenizer):
    for method in ("gptq", "awq"):
        model = make_model(len(tokenizer), layers=2)
        ctx = Context(tokenizer=tokenizer)
        config = QuantizeConfig(method=method, bits=4, calibration_tokens=1024, calibration_block=128, ppl_windows=1, ppl_window=128)
        quantize(model, config, ctx)
        metrics = artifact.lineage(model)["stages"][-1]["metrics"]
        assert metrics["ppl_before"] > 1 and "ppl_change" in metrics and metrics["stored_bytes"] > 0
    with pytest.raises(DataError, match=r"gptq needs at least 256 calibration tokens .* raise calibration_tokens"):
        quantize(make_model(len(tokenizer), layers=2), QuantizeConfig(method="gptq", calibration_tokens=100), Context(tokenizer=tokenizer))


def _quantized_logits(tokenizer, config, x):
    model = quantize(make_model(len(tokenizer), layers=2), config, Context(tokenizer=tokenizer))
    with torch.no_grad():
        return model(x).logits


def test_awq_with_gptq_rounding_and_unit_scales_is_gptq(tokenizer):
    # awq_grid 1 tries only alpha = 0, whose scales are all ones: what is left is GPTQ, Hessian factor included.
    x = sample_blocks(tokenizer, "corpus:heldout", 128, 2, seed=0)
    common = dict(bits=3, calibration_tokens=1024, calibration_block=128, ppl_text=None)
    gptq = _quantized_logits(tokenizer, QuantizeConfig(method="gptq", **common), x)
    awq_gptq = _quantized_logits(tokenizer, QuantizeConfig(method="awq", awq_rounding="gptq", awq_grid=1, **common), x)
    assert torch.allclose(awq_gptq, gptq, atol=1e-4)


def test_awq_with_gptq_rounding_beats_awq_with_rtn_rounding(tokenizer):
    x = sample_blocks(tokenizer, "corpus:heldout", 128, 4, seed=0)
    with torch.no_grad():
        reference = make_model(len(tokenizer), layers=2)(x).logits
    common = dict(method="awq", bits=3, calibration_tokens=2048, calibration_block=128, ppl_text=None)
    errors = {rounding: (_quantized_logits(tokenizer, QuantizeConfig(awq_rounding=rounding, **common), x) - reference).pow(2).mean().item()
              for rounding in ("rtn", "gptq")}
    assert errors["gptq"] < 0.8 * errors["rtn"]
    with pytest.raises(ConfigError, match="awq_rounding: must be rtn or gptq"):
        QuantizeConfig(method="awq", awq_rounding="nearest").validate("quantize")
    with pytest.raises(ConfigError, match="awq_rounding: applies to method awq only"):
        QuantizeConfig(method="gptq", awq_rounding="gptq").validate("quantize")


def test_calibration_from_the_models_own_samples_comes_from_the_float_model(tmp_path, monkeypatch, tokenizer):
    from minigiant.quantize.calibration import calibration_ids

    monkeypatch.setenv("MINIGIANT_CACHE", str(tmp_path / "cache"))
    model = make_model(len(tokenizer), layers=2)
    config = QuantizeConfig(method="awq", calibration="corpus:train+samples", calibration_tokens=1024, calibration_block=128)
    ids = calibration_ids(model, config, Context(tokenizer=tokenizer), 64, "awq")
    assert ids.shape == (8, 128)
    assert len(list((tmp_path / "cache" / "samples").glob("samples-*.txt"))) == 1
    quantize(model, config, Context(tokenizer=tokenizer))  # the same samples (cached) calibrate AWQ
    assert len(list((tmp_path / "cache" / "samples").glob("samples-*.txt"))) == 1


def test_mixed_precision_meets_the_bit_budget_with_different_widths(tokenizer):
    model = make_model(len(tokenizer), layers=2)
    config = QuantizeConfig(target_bits=4.0, bit_choices=[2, 4, 8], embedding_bits=None, calibration_tokens=512, calibration_block=128, ppl_text=None)
    quantize(model, config, Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert metrics["linear_bits_per_weight"] <= 4.0
    widths = {s["bits"] for s in artifact.lineage(model)["quantization"]["modules"]}
    assert len(widths) >= 2


def test_mixed_precision_ranks_layers_by_relative_error_so_a_rescaled_layer_keeps_its_width(tokenizer):
    from minigiant.quantize import _plan
    from minigiant.quantize.mixed import assign_bits

    config = QuantizeConfig(target_bits=4.0, bit_choices=[2, 4, 8], embedding_bits=None, calibration_tokens=512, calibration_block=128, ppl_text=None)

    def widths(model):
        plan = _plan(model, config)[0]
        return {name: fmt.bits for name, _, fmt in assign_bits(model, plan, config, Context(tokenizer=tokenizer))}

    model = make_model(len(tokenizer), layers=2)
    before = widths(model)
    last = "model.layers.1.mlp.down_proj"
    with torch.no_grad():  # 100× larger outputs, 10^4× larger absolute error, the same relative error
        model.get_submodule(last).weight.mul_(100)
    assert widths(model) == before and len(set(before.values())) >= 2


@pytest.mark.parametrize("settings,message", [
    ({"format": "q4_2"}, "did you mean 'q4_1'"),
    ({"method": "kmeans", "bits": 8}, "1-4-bit"),
    ({"method": "ternary", "bits": 4}, "set bits: 2"),
    ({"method": "kmeans", "format": "q4_0"}, "remove format"),
    ({"symmetric": True, "zero_point": "float"}, "symmetric grid has no zero point"),
    ({"bits": 7}, "bits: must be one of"),
    ({"scale_dtype": "float8"}, "scale_dtype"),
])
def test_formats_that_do_not_exist_raise_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(QuantizeConfig, settings, "quantize")


def test_odd_width_group_that_does_not_divide_names_the_layer():
    with pytest.raises(ConfigError, match=r"does not divide the 64 input features of model\.layers\.0\.self_attn\.q_proj"):
        quantize(tiny(), QuantizeConfig(bits=3, group_size=48, embedding_bits=None))
