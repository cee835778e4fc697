import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import make_model
from minigiant import artifact
from minigiant.config import from_dict
from minigiant.errors import ConfigError
from minigiant.models.architecture import total_parameters
from minigiant.models.loading import load
from minigiant.quantize import QuantEmbedding, QuantizeConfig, QuantLinear, TiedQuantLinear, is_quantized, quantize
from minigiant.quantize.formats import WeightFormat, dequantize, pack, quantize_rtn, unpack
from minigiant.quantize.serialization import WEIGHTS_FILE, load_packed

VOCAB = 256


def tiny(tie: bool = True, hidden: int = 64):
    return make_model(VOCAB, layers=2, tie=tie, hidden=hidden)


def ids(length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def save_and_reload(model, path):
    artifact.save(model, None, path)
    return load_packed(path, artifact.read_lineage(path))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_4bit_layout_puts_the_first_code_in_the_low_nibble():
    assert pack(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_is_small_and_shrinks_with_bits(symmetric):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = {}
    for bits in (8, 4):
        fmt = WeightFormat(bits, 32, symmetric)
        q = quantize_rtn(weight, fmt)
        assert q.scales.dtype == torch.float16 and q.scales.shape == (64, 8)
        assert (q.zeros is None) == symmetric and (symmetric or q.zeros.dtype == torch.uint8)
        errors[bits] = ((dequantize(q, fmt, torch.float32) - weight).norm() / weight.norm()).item()
    assert errors[8] < 0.01 and errors[4] < 0.15
    assert errors[8] < errors[4] / 8  # each extra bit halves the step


def test_zero_weights_stay_exactly_zero():
    weight = torch.randn(4, 32)
    weight[0] = 0  # an all-zero group must not divide by zero
    weight[1, :5] = 0
    for symmetric in (False, True):
        fmt = WeightFormat(4, 32, symmetric)
        restored = dequantize(quantize_rtn(weight, fmt), fmt, torch.float32)
        assert torch.all(restored[0] == 0) and torch.all(restored[1, :5] == 0)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_restore_identical_logits(tmp_path, tie):
    model = tiny(tie=tie)
    quantize(model, QuantizeConfig(bits=4, group_size=32))
    assert isinstance(model.lm_head, TiedQuantLinear if tie else QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.bits == 8
    if not tie:
        assert model.lm_head.bits == 4  # an untied head is a linear layer at `bits`
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        reloaded = save_and_reload(model, tmp_path / "q")
        assert torch.equal(reloaded(x).logits, expected)
    assert is_quantized(reloaded) and reloaded.minigiant_lineage["quantization"] == artifact.lineage(model)["quantization"]
    assert all(not t.is_meta for t in [*reloaded.parameters(), *reloaded.buffers()])
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_models_loading_load_opens_a_quantized_directory(tmp_path, tokenizer):
    model = make_model(len(tokenizer), layers=2)
    quantize(model, QuantizeConfig(bits=4))
    x = torch.randint(0, len(tokenizer), (1, 10))
    with torch.no_grad():
        expected = model(x).logits
    artifact.save(model, tokenizer, tmp_path / "q")
    reloaded, reloaded_tokenizer = load(tmp_path / "q")
    assert len(reloaded_tokenizer) == len(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)
    assert [s["stage"] for s in reloaded.minigiant_lineage["stages"]] == ["quantize"]
    # Plain transformers must refuse the packed directory rather than fill it with random float weights.
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_int4_weights_take_a_quarter_of_their_fp16_bytes(tmp_path):
    model = tiny(hidden=128)
    quantize(model, QuantizeConfig(bits=4, group_size=128, embedding_bits=None))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert metrics["bits_per_weight"] == 4 + 16 / 128 + 8 / 128
    artifact.save(model, None, tmp_path / "q")
    tensors = stored(tmp_path / "q")
    linears = [s["name"] for s in artifact.lineage(model)["quantization"]["modules"]]
    packed = sum(tensors[f"{n}.{b}"].numel() * tensors[f"{n}.{b}"].element_size() for n in linears for b in ("qweight", "scales", "zeros"))
    fp16 = sum(2 * model.get_submodule(n).logical_numel() for n in linears)
    assert tensors[f"{linears[0]}.qweight"].dtype == torch.uint8
    assert 3.5 < fp16 / packed < 4.1


def test_tied_head_shares_the_embedding_storage_and_is_saved_once(tmp_path):
    model = tiny(tie=True)
    params = total_parameters(model)
    quantize(model)
    embedding = model.model.embed_tokens
    assert model.lm_head.qweight is embedding.qweight and model.lm_head.scales is embedding.scales
    assert total_parameters(model) == params  # logical size, the shared tensor counted once
    twin = copy.deepcopy(model)  # what pipeline.py does to each stage's input
    assert twin.lm_head.qweight is twin.model.embed_tokens.qweight
    artifact.save(model, None, tmp_path / "q")
    names = set(stored(tmp_path / "q"))
    assert "model.embed_tokens.qweight" in names and not any(n.startswith("lm_head") for n in names)
    reloaded = load_packed(tmp_path / "q", artifact.read_lineage(tmp_path / "q"))
    assert reloaded.lm_head.qweight is reloaded.model.embed_tokens.qweight


def test_float_tied_embedding_is_saved_once_and_retied(tmp_path):
    model = tiny(tie=True)
    quantize(model, QuantizeConfig(bits=8, embedding_bits=None))
    assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        reloaded = save_and_reload(model, tmp_path / "q")
        assert torch.equal(reloaded(x).logits, expected)
    assert "lm_head.weight" not in stored(tmp_path / "q")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_generate_with_kv_cache_matches_generation_without_it():
    model = quantize(tiny(), QuantizeConfig(bits=4))
    x = ids(6)[:1]
    cached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)


def test_ignore_keeps_modules_float_and_per_channel_groups_work(tmp_path):
    model = quantize(tiny(tie=False), QuantizeConfig(bits=2, group_size=-1, symmetric=True, ignore=["down_proj", "lm_head"]))
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert layer.mlp.up_proj.group_size == 64 and layer.mlp.up_proj.zeros is None
    x = ids()
    with torch.no_grad():
        assert torch.equal(save_and_reload(model, tmp_path / "q")(x).logits, model(x).logits)


def test_explicit_targets_pick_only_the_named_linears():
    model = quantize(tiny(tie=False), QuantizeConfig(targets=["q_proj", "re:layers\\.1\\.mlp"], embedding_bits=None))
    quantized = {s["name"] for s in artifact.lineage(model)["quantization"]["modules"]}
    assert quantized == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"} | {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


def test_bfloat16_cast_keeps_float16_scales_and_reloads_exactly(tmp_path):
    model = quantize(tiny(), QuantizeConfig(bits=4)).to(torch.bfloat16)
    assert model.model.embed_tokens.scales.dtype == torch.float16
    x = ids()
    with torch.no_grad():
        logits = model(x).logits
        assert logits.dtype == torch.bfloat16
        assert torch.equal(save_and_reload(model, tmp_path / "q")(x).logits, logits)


def test_bad_settings_and_double_quantization_raise_config_error():
    model = tiny()
    with pytest.raises(ConfigError, match=r"group_size: 48 does not divide .* of model\.embed_tokens"):
        quantize(model, QuantizeConfig(group_size=48))
    assert not is_quantized(model)  # checked before anything is replaced
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize\.bits"):
        from_dict(QuantizeConfig, {"bits": 7}, "stages[0].quantize")
    with pytest.raises(ConfigError, match="group_size"):
        from_dict(QuantizeConfig, {"group_size": 0}, "quantize")
    with pytest.raises(ConfigError, match="did you mean 'rtn'"):
        from_dict(QuantizeConfig, {"method": "rtm"}, "quantize")
    quantize(model)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(model)


def test_embedding_group_size_gives_the_tied_head_one_scale_per_row_and_round_trips(tmp_path):
    from minigiant.quantize.kernels import best_kind

    model = quantize(tiny(), QuantizeConfig(bits=4, group_size=32, embedding_group_size=-1, ppl_text=None))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, TiedQuantLinear)
    assert embedding.group_size == 64 and embedding.scales.shape == (VOCAB, 1) and embedding.bits == 8
    assert model.model.layers[0].mlp.up_proj.group_size == 32  # the linear layers keep theirs
    assert best_kind(embedding) == "int8pack"  # the head runs the embedding's runtime
    reloaded = save_and_reload(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)
    with pytest.raises(ConfigError, match="embedding_group_size: must be a positive number"):
        QuantizeConfig(embedding_group_size=0).validate("quantize")
