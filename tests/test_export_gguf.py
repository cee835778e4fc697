"""GGUF export: files read back with the gguf package, transformers loads them with the same logits, k-quant
packing round-trips exactly through gguf's dequantizer, llama.cpp's per-tensor type rules, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from minigiant.errors import ConfigError  # noqa: E402
from minigiant.export import ExportConfig, export  # noqa: E402
from minigiant.export.kquants import quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k  # noqa: E402
from minigiant.export.tensor_types import EXPORT_TYPES, tensor_type, use_more_bits  # noqa: E402


def _reader(path):
    return gguf.GGUFReader(path)


def _field(reader, key):
    return reader.fields[key].contents()


def _reload_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids(vocab):
    return torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind, atol", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 6e-2)])
def test_export_reloads_in_transformers_with_the_same_logits(tmp_path, tokenizer, kind, atol):
    model = make_model(len(tokenizer))
    ids = _ids(len(tokenizer))
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / f"tiny-{kind}.gguf"
    export(model, tokenizer, path, ExportConfig(type=kind))
    got = _reload_logits(path, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < atol
    # the Q/K permutation matters: without it the logits of an f32 export would differ by far more
    if kind == "f32":
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_gguf_metadata_tokenizer_and_tensor_types(tmp_path, tokenizer):
    model = make_model(len(tokenizer), layers=3)
    path = tmp_path / "tiny.gguf"
    report = export(model, tokenizer, path, ExportConfig(type="q8_0"))
    r = _reader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 3
    assert _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.feed_forward_length") == 128
    assert _field(r, "llama.attention.head_count") == 4 and _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL
    assert len(_field(r, "tokenizer.ggml.merges")) > 0
    assert _field(r, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(r, "tokenizer.chat_template") == tokenizer.chat_template
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp reads token_embd
    assert len(tensors) == 2 + 3 * 9
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [128, 64]  # GGUF lists ne0 (columns) first
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32
    assert report["tensor_types"] == {"Q8_0": 1 + 3 * 7, "F32": 1 + 3 * 2}
    # bits per weight counts every tensor: Q8_0 is 8.5 bits, the float32 norms pull it up a little
    assert 8.5 < report["bits_per_weight"] < 8.6
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./tiny.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_modelfile_carries_the_repetition_penalty_and_the_report_names_the_answer_ngram_ban(tmp_path, tokenizer):
    model = make_model(len(tokenizer))
    plain = export(model, tokenizer, tmp_path / "plain.gguf", ExportConfig(type="f32"))
    assert "repeat_penalty" not in (tmp_path / "Modelfile").read_text() and "not_carried" not in plain
    model.generation_config.repetition_penalty = 1.15
    model.generation_config.answer_no_repeat_ngram_size = 4
    report = export(model, tokenizer, tmp_path / "tuned.gguf", ExportConfig(type="f32"))
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "PARAMETER repeat_penalty 1.15" in modelfile and "PARAMETER repeat_last_n -1" in modelfile
    assert report["not_carried"] == ["answer_no_repeat_ngram_size 4"]


def test_quantized_minigiant_model_exports_its_dequantized_weights(tmp_path, tokenizer):
    from minigiant.quantize import QuantizeConfig, quantize

    model = quantize(make_model(len(tokenizer)), QuantizeConfig(bits=8, group_size=32, symmetric=True, embedding_bits=8))
    ids = _ids(len(tokenizer))
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / "int8.gguf"
    export(model, tokenizer, path, ExportConfig(type="f32"))
    assert (_reload_logits(path, ids) - expected).abs().max().item() < 1e-5
    # 8-bit symmetric groups of 32 lie on Q8_0's grid: the Q8_0 export re-rounds them to the same values
    export(model, tokenizer, tmp_path / "int8-q8.gguf", ExportConfig(type="q8_0"))
    assert (_reload_logits(tmp_path / "int8-q8.gguf", ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind, method", [("q4_k_m", "gptq"), ("q4_0", "awq"), ("q4_1", "rtn"), ("q5_1", "rtn")])
def test_quantizing_for_a_gguf_type_exports_the_codes_unchanged(tmp_path, tokenizer, kind, method):
    """``quantize --gguf TYPE`` puts each weight on the block grid its tensor gets, and the export of that type
    writes those very codes (no second rounding): gguf's own dequantization equals ours bit for bit, and
    transformers reloads the file with the quantized model's logits."""
    from minigiant.context import Context
    from minigiant.export.gguf_file import permute_rows
    from minigiant.quantize import QuantizeConfig, quantize

    model = make_model(len(tokenizer), layers=2)
    config = QuantizeConfig(method=method, gguf=kind, calibration_tokens=1024, calibration_block=128, ppl_text=None)
    quantize(model, config, Context(tokenizer=tokenizer))
    ids = _ids(len(tokenizer))
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / f"planned-{kind}.gguf"
    report = export(model, tokenizer, path, ExportConfig(type=kind))
    assert report["exact_tensors"] == 1 + 2 * 7 and report["rerounded_tensors"] == []
    tensors = {t.name: t for t in _reader(path).tensors}
    ours = {"token_embd": model.model.embed_tokens, "blk.0.attn_q": model.model.layers[0].self_attn.q_proj,
            "blk.1.attn_k": model.model.layers[1].self_attn.k_proj, "blk.1.ffn_down": model.model.layers[1].mlp.down_proj}
    for name, module in ours.items():
        t = tensors[f"{name}.weight"]
        assert t.tensor_type.name.lower() == {"q4_k_m": "q5_0"}.get(kind, kind) or name in ("token_embd", "blk.1.ffn_down")
        weight = module.dequantize(torch.float32).numpy()
        heads = {"blk.0.attn_q": 4, "blk.1.attn_k": 2}.get(name)
        weight = permute_rows(weight, heads) if heads else weight
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), weight)
    assert (_reload_logits(path, ids) - expected).abs().max().item() < 1e-4


def test_a_quantized_model_on_another_grid_is_rounded_again_and_reported(tmp_path, tokenizer):
    from minigiant.quantize import QuantizeConfig, quantize

    model = quantize(make_model(len(tokenizer), layers=2), QuantizeConfig(bits=4, group_size=32, embedding_bits=None, ppl_text=None))
    report = export(model, tokenizer, tmp_path / "rerounded.gguf", ExportConfig(type="q4_0"))
    assert report["exact_tensors"] == 0
    assert len(report["rerounded_tensors"]) == 2 * 7 and "model.layers.0.mlp.up_proj.weight" in report["rerounded_tensors"]


def test_gguf_planned_quantization_refuses_what_it_cannot_plan(tokenizer):
    from minigiant import artifact
    from minigiant.quantize import QuantizeConfig, quantize

    with pytest.raises(ConfigError, match=r"quantize.gguf: unknown GGUF type 'q4_k_s'"):
        QuantizeConfig(gguf="q4_k_s").validate("quantize")
    with pytest.raises(ConfigError, match=r"method kmeans does not round onto GGUF's block grids"):
        QuantizeConfig(gguf="q4_0", method="kmeans").validate("quantize")
    with pytest.raises(ConfigError, match=r"remove target_bits"):
        QuantizeConfig(gguf="q4_0", target_bits=4.0).validate("quantize")
    # a k-quant tensor has no minigiant grid: left float, and said so
    model = make_model(len(tokenizer), layers=2, hidden=256)
    quantize(model, QuantizeConfig(gguf="q4_k_m", ppl_text=None))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert "model.layers.0.self_attn.q_proj" in metrics["gguf_left_float"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_pruned_shapes_export(tmp_path, tokenizer):
    """Fewer layers, a smaller MLP and fewer heads than hidden / head_dim (head_dim stays 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    ids = _ids(len(tokenizer))
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / "pruned.gguf"
    report = export(model, tokenizer, path, ExportConfig(type="f32"))
    r = _reader(path)
    assert _field(r, "llama.attention.key_length") == 16 and _field(r, "llama.feed_forward_length") == 96
    assert not report["tied_embeddings"] and "output.weight" in {t.name for t in r.tensors}
    assert (_reload_logits(path, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("pack, qtype", [(quantize_q3_k, T.Q3_K), (quantize_q4_k, T.Q4_K), (quantize_q5_k, T.Q5_K), (quantize_q6_k, T.Q6_K)])
def test_kquant_packing_round_trips_exactly_through_gguf(pack, qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    w[1, :256] = 0  # an all-zero super-block
    w[2, :32] = 0  # an all-zero sub-block
    w[3] = np.abs(w[3])  # no negative weight: the min is 0
    w[4, 7] = 3.0  # an outlier
    packed, reference = pack(w)
    assert packed.dtype == np.uint8 and packed.shape == (8, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(gguf.quants.dequantize(packed, qtype), reference)
    assert np.all(reference[1, :256] == 0)
    # and the values are a good approximation: better than the 32-block type of (about) the same bits; Q3_K,
    # which has none, better than plain 3-bit absmax rounding in its own 16-weight blocks
    rows = [0, 5, 6, 7]
    if qtype == T.Q3_K:
        x = w[rows].reshape(-1, 16)
        d = np.abs(x).max(axis=1, keepdims=True) / 4
        coarse = (np.clip(np.round(x / d), -4, 3) * d).reshape(len(rows), -1)
    else:
        simple = {T.Q4_K: T.Q4_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q5_0}[qtype]
        coarse = gguf.quants.dequantize(gguf.quants.quantize(w, simple), simple)[rows]
    assert np.linalg.norm(reference[rows] - w[rows]) < np.linalg.norm(coarse - w[rows])


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_0"])
def test_searched_block_scales_round_trip_exactly_with_less_error(name):
    from minigiant.export.blockquants import SEARCHED

    qtype = T[name]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    w[1, :32] = 0
    w[2, 5] = 1.0  # an outlier: absmax scaling wastes the grid on it
    packed, reference = SEARCHED[name](w)
    llama = gguf.quants.quantize(w, qtype)
    assert packed.shape == llama.shape and packed.dtype == np.uint8
    assert np.array_equal(gguf.quants.dequantize(packed, qtype), reference)
    assert np.all(reference[1, :32] == 0)
    ours_error = ((reference - w) ** 2).reshape(-1, 32).sum(axis=1)
    llama_error = ((gguf.quants.dequantize(llama, qtype) - w) ** 2).reshape(-1, 32).sum(axis=1)
    assert ours_error.sum() < 0.95 * llama_error.sum()
    assert np.all(ours_error <= llama_error * (1 + 1e-3) + 1e-12)  # no block worse (up to float16 rounding of d)


def test_llama_cpp_rounding_writes_the_reference_bytes(tmp_path, tokenizer):
    model = make_model(len(tokenizer), layers=1)
    export(model, tokenizer, tmp_path / "ref.gguf", ExportConfig(type="q4_0", rounding="llama.cpp", modelfile=False))
    tensor = next(t for t in _reader(tmp_path / "ref.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    expected = gguf.quants.quantize(model.model.layers[0].mlp.up_proj.weight.detach().numpy(), T.Q4_0)
    assert np.array_equal(np.asarray(tensor.data), expected)


@pytest.mark.parametrize("pack, qtype, low", [(quantize_q6_k, T.Q6_K, -32), (quantize_q3_k, T.Q3_K, -4)])
def test_symmetric_kquant_of_a_weight_on_its_grid_is_exact(pack, qtype, low):
    """A super-block whose weights are d * scale * q with in-range codes packs without loss."""
    rng = np.random.default_rng(1)
    q = rng.integers(low, -low, size=(1, 256)).astype(np.float32)
    q[0, ::16] = low  # every sub-block reaches the end of the grid
    w = q * np.float32(0.125)
    packed, reference = pack(w)
    assert np.array_equal(reference, w)
    assert np.array_equal(gguf.quants.dequantize(packed, qtype), w)


def test_tensor_types_follow_llama_quantize():
    kind = EXPORT_TYPES["q4_k_m"]
    n = 30
    # llama.cpp's use_more_bits for 30 layers: 0-2, 26-29 and every third from 3 (5, 8, ...)
    assert [i for i in range(n) if use_more_bits(i, n)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), kind, n, True) == T.Q6_K
    assert tensor_type("blk.3.ffn_down.weight", (576, 1536), kind, n, True) == T.Q4_K
    assert tensor_type("blk.3.ffn_up.weight", (1536, 576), kind, n, True) == T.Q5_0  # 576 % 256: fallback
    assert tensor_type("blk.0.attn_v.weight", (192, 576), kind, n, True) == T.Q8_0  # Q6_K → fallback
    assert tensor_type("token_embd.weight", (49152, 512), kind, n, True) == T.Q6_K  # tied: the head's type
    assert tensor_type("token_embd.weight", (49152, 512), kind, n, False) == T.Q4_K
    assert tensor_type("output.weight", (49152, 512), EXPORT_TYPES["q4_0"], n, False) == T.Q6_K
    assert tensor_type("output.weight", (49152, 512), EXPORT_TYPES["q8_0"], n, False) == T.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (512, 512), EXPORT_TYPES["tq2_0"], n, False) == T.TQ2_0
    assert tensor_type("blk.0.attn_q.weight", (64, 64), EXPORT_TYPES["tq2_0"], n, False) == T.Q4_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), EXPORT_TYPES["q4_k_m"], n, False) == T.F16  # 48 % 32
    assert tensor_type("blk.0.attn_norm.weight", (64,), kind, n, False) == T.F32
    # q5_k_m bumps like q4_k_m; q3_k_m keeps Q3_K only for q, k, gate and up
    assert tensor_type("blk.0.ffn_down.weight", (512, 512), EXPORT_TYPES["q5_k_m"], n, True) == T.Q6_K
    assert tensor_type("blk.3.ffn_down.weight", (512, 512), EXPORT_TYPES["q5_k_m"], n, True) == T.Q5_K
    q3 = EXPORT_TYPES["q3_k_m"]
    assert [tensor_type(f"blk.{i}.attn_v.weight", (256, 512), q3, n, True) for i in (0, 1, 2)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [tensor_type(f"blk.{i}.ffn_down.weight", (512, 512), q3, n, True) for i in (0, 1, 2)] == [T.Q5_K, T.Q4_K, T.Q4_K]  # 30 // 16 = 1
    assert tensor_type("blk.5.attn_output.weight", (512, 512), q3, n, True) == T.Q4_K
    assert tensor_type("blk.5.attn_q.weight", (512, 512), q3, n, True) == tensor_type("blk.5.ffn_up.weight", (512, 512), q3, n, True) == T.Q3_K
    assert tensor_type("blk.5.ffn_up.weight", (1536, 576), q3, n, True) == T.Q4_0  # 576 % 256: Q3_K's fallback


@pytest.mark.parametrize("kind", ["q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "tq2_0"])
def test_every_type_reads_back_with_gguf(tmp_path, tokenizer, kind):
    """hidden 256 so the k-quant and ternary types are used as such, not their fallbacks."""
    model = make_model(len(tokenizer), layers=2, hidden=256)
    path = tmp_path / f"{kind}.gguf"
    report = export(model, tokenizer, path, ExportConfig(type=kind, modelfile=False))
    r = _reader(path)
    weights = dict(model.named_parameters())
    for t in r.tensors:
        assert t.tensor_type.name == report["types"][t.name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert values.shape == tuple(reversed([int(x) for x in t.shape]))
    stored = {t.name: t.tensor_type for t in r.tensors}
    expected_down = {"q3_k_m": (T.Q4_K, T.Q4_K), "q4_k_m": (T.Q4_K, T.Q6_K), "q5_k_m": (T.Q5_K, T.Q6_K), "q6_k": (T.Q6_K,) * 2, "q4_0": (T.Q4_0,) * 2, "tq2_0": (T.TQ2_0,) * 2}[kind]
    assert (stored["blk.0.ffn_down.weight"], stored["blk.1.ffn_down.weight"]) == expected_down  # 2 layers: more bits in the last
    up = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    original = weights["model.layers.1.mlp.up_proj.weight"].detach().numpy()
    error = np.linalg.norm(gguf.quants.dequantize(up.data, up.tensor_type) - original) / np.linalg.norm(original)
    assert error < {"q3_k_m": 0.22, "q4_k_m": 0.12, "q5_k_m": 0.06, "q6_k": 0.03, "q4_0": 0.15, "tq2_0": 0.85}[kind]  # ternary: absmax scale (gguf's packer)
    assert not (tmp_path / "Modelfile").exists()


def test_bad_input_fails_clearly(tmp_path, tokenizer):
    model = make_model(len(tokenizer), layers=1)
    with pytest.raises(ConfigError, match="unknown GGUF type 'q4_k_x'.*did you mean 'q4_k_m'"):
        export(model, tokenizer, tmp_path / "x.gguf", ExportConfig(type="q4_k_x"))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="'gpt2' architecture cannot be written as GGUF"):
        export(gpt2, tokenizer, tmp_path / "x.gguf", ExportConfig(type="f16"))
    model.config.attention_bias = True
    with pytest.raises(ConfigError, match="attention_bias"):
        export(model, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli_export(tmp_path, tiny_model_dir, capsys):
    from minigiant.cli import main

    out = tmp_path / "cli" / "model.gguf"
    assert main(["export", str(tiny_model_dir), str(out), "--type", "q4_0"]) == 0
    assert out.is_file() and (out.parent / "Modelfile").is_file()
    assert "q4_0" in capsys.readouterr().out
    assert main(["export", str(tiny_model_dir), str(out), "--type", "q3"]) == 1
    assert "unknown GGUF type 'q3'" in capsys.readouterr().err


def test_cli_quantize_for_a_gguf_type_then_export_it_code_for_code(tmp_path, tiny_model_dir, capsys):
    from minigiant.cli import main

    planned = tmp_path / "planned"
    assert main(["quantize", str(tiny_model_dir), str(planned), "--gguf", "q4_0", "--ppl-text", "null"]) == 0
    capsys.readouterr()
    assert main(["export", str(planned), str(tmp_path / "planned.gguf")]) == 0  # the type defaults to the planned one
    out = capsys.readouterr().out
    assert "(q4_0, " in out and "tensors written code for code" in out
    # exported as another type, the same codes are rounded again, and the CLI says how to avoid it
    assert main(["export", str(planned), str(tmp_path / "other.gguf"), "--type", "q8_0"]) == 0
    assert "--gguf q8_0" in capsys.readouterr().err
