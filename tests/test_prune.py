import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.errors import BudgetError, ConfigError, DataError
from minigiant.models.architecture import decoder_layers, non_embedding_parameters
from minigiant.prune import PruneConfig, prune
from minigiant.prune.depth import angular_block, block_influence

SMALL = dict(calibration_blocks=4, block_size=32, batch_size=2)


def test_block_influence_removes_least_influential_layers_to_budget():
    # cos[i, i+1] high = the layer barely changes its input = low influence
    cos = torch.eye(5, dtype=torch.float64)
    for i, c in enumerate([0.5, 0.99, 0.7, 0.95]):
        cos[i, i + 1] = c
    assert sorted(block_influence(cos, [10, 10, 10, 10], budget=20)) == [1, 3]
    assert block_influence(cos, [10, 10, 10, 10], budget=40) == []


def test_angular_block_picks_closest_contiguous_block():
    cos = torch.full((6, 6), 0.0, dtype=torch.float64)
    cos[2, 4] = 0.99  # layers 2..3 barely change the state
    cos[0, 2] = 0.5
    assert angular_block(cos, [1] * 5, budget=3) == [2, 3]


def test_prune_removes_exactly_the_chosen_layers_and_reloads(tmp_path, tokenizer):
    model = make_model(len(tokenizer), layers=6)
    original = [layer.mlp.down_proj.weight.clone() for layer in decoder_layers(model)]
    before = non_embedding_parameters(model)
    prune(model, PruneConfig(target=0.5, **SMALL), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    kept, removed = metrics["kept_layers"], metrics["removed_layers"]
    assert len(kept) == 3 and len(removed) == 3 and sorted(kept + removed) == list(range(6))
    assert model.config.num_hidden_layers == 3
    for layer, index in zip(decoder_layers(model), kept):  # the kept layers are the originals, untouched
        assert torch.equal(layer.mlp.down_proj.weight, original[index])
    assert non_embedding_parameters(model) <= 0.5 * before + 1000
    x = torch.randint(0, len(tokenizer), (1, 16))
    expected = model(x).logits
    artifact.save(model, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain transformers
    assert reloaded.config.num_hidden_layers == 3
    assert torch.allclose(reloaded(x).logits, expected, atol=1e-5)
    out = reloaded.generate(x, max_new_tokens=4, do_sample=False)  # the KV cache indices are consistent
    assert out.shape == (1, 20)


def test_prune_target_that_removes_every_layer_fails(tokenizer):
    model = make_model(len(tokenizer), layers=4)
    with pytest.raises(BudgetError, match="less than one decoder layer"):
        prune(model, PruneConfig(target=0.1, **SMALL), Context(tokenizer=tokenizer))
    assert model.config.num_hidden_layers == 4


def test_unknown_method_suggests_the_right_name(tokenizer):
    with pytest.raises(ConfigError, match="did you mean 'block_influence'"):
        prune(make_model(len(tokenizer)), PruneConfig(method="block_influense", **SMALL), Context(tokenizer=tokenizer))


def test_keep_layers_works_for_gpt2_style_models_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigiant.models.architecture import keep_layers

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)).eval()
    third = model.transformer.h[2]
    keep_layers(model, [0, 2])
    assert model.config.n_layer == 2 and model.transformer.h[1] is third
    assert model(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


def test_linear_patch_brings_the_pruned_model_closer_to_the_teacher_and_reloads(tmp_path, tokenizer):
    from minigiant.data import sample_blocks
    from minigiant.prune.patch import removed_runs

    assert removed_runs([5, 1, 2, 7, 8]) == [(1, 2), (5, 5), (7, 8)]
    reference = make_model(len(tokenizer), layers=6)
    blocks = sample_blocks(tokenizer, "corpus:train", 32, 4, 0)
    with torch.no_grad():
        target = reference(blocks, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for patch in (False, True):
        model = make_model(len(tokenizer), layers=6)
        prune(model, PruneConfig(target=0.6, linear_patch=patch, **SMALL), Context(tokenizer=tokenizer))
        with torch.no_grad():
            errors[patch] = ((model(blocks, output_hidden_states=True).hidden_states[-1] - target) ** 2).mean().item()
    assert errors[True] < errors[False]
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert metrics["patched_layers"] and all(i + 1 in metrics["removed_layers"] for i in metrics["patched_layers"])
    x = torch.randint(0, len(tokenizer), (1, 8))
    artifact.save(model, tokenizer, tmp_path / "p")
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "p")(x).logits, model(x).logits, atol=1e-5)


def test_model_samples_are_generated_once_and_cached(tmp_path, monkeypatch, tokenizer):
    from minigiant.data import samples

    monkeypatch.setenv("MINIGIANT_CACHE", str(tmp_path / "cache"))
    model = make_model(len(tokenizer))
    path = samples.model_samples(model, tokenizer, 600, seed=0)
    text = path.read_text()
    assert len(tokenizer(text)["input_ids"]) >= 600 * 0.9  # decode/encode may merge a few tokens
    assert path.parent == tmp_path / "cache" / "samples"

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    import importlib

    monkeypatch.setattr(importlib.import_module("minigiant.generate"), "sample_continuations", no_generation)
    assert samples.model_samples(model, tokenizer, 600, seed=0) == path
    with pytest.raises(AssertionError, match="generated again"):
        samples.model_samples(model, tokenizer, 600, seed=1)  # another seed: other samples
    monkeypatch.undo()
    monkeypatch.setenv("MINIGIANT_CACHE", str(tmp_path / "cache"))
    more = samples.model_samples(model, tokenizer, 40 * 256, seed=0)  # more than one batch holds: extended
    assert more != path and not path.exists()
    assert more.read_text().startswith(text)  # the samples already there stay first, unchanged
    fresh = samples.model_samples(model, tokenizer, 40 * 256, seed=0, cache_dir=tmp_path / "fresh")
    assert fresh.read_text() == more.read_text()  # extending gives what generating at once gives


def test_prune_calibrates_on_the_models_own_samples(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MINIGIANT_CACHE", str(tmp_path / "cache"))
    model = make_model(len(tokenizer))
    config = PruneConfig(structure="width", width_parts="mlp", target=0.7, calibration_text="corpus:train+samples",
                         calibration_blocks=4, block_size=32, multiple_of=1)
    prune(model, config, Context(tokenizer=tokenizer))
    stage = artifact.lineage(model)["stages"][-1]
    assert stage["settings"]["calibration_text"] == "corpus:train+samples"
    corpus, file = stage["metrics"]["calibration_file"].split("+")
    assert corpus == "corpus:train" and file.startswith(str(tmp_path / "cache" / "samples"))


def test_a_mix_of_texts_takes_equal_shares(tmp_path, tokenizer):
    from minigiant.data.text import load_documents, sample_blocks

    (tmp_path / "a.txt").write_text("the time machine " * 400)
    (tmp_path / "b.txt").write_text("war of the worlds " * 400)
    blocks = sample_blocks(tokenizer, f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}", 16, 7, seed=0)
    texts = [tokenizer.decode(b) for b in blocks]
    assert len(texts) == 7
    assert sum("machine" in t for t in texts) == 4 and sum("worlds" in t for t in texts) == 3
    with pytest.raises(DataError, match="calibration text for prune and quantize only"):
        load_documents("samples")
