"""Unstructured and N:M sparsity on tiny random Llama models."""

import pytest
import torch

from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.errors import ConfigError
from minigiant.models.architecture import decoder_layers
from minigiant.prune import SPARSITY_METHODS, PruneConfig, prune
from minigiant.prune.calibration import collect_input_statistics

SMALL = dict(calibration_blocks=4, block_size=32, batch_size=2)


def _layer_stats(tokenizer, model, module):
    from minigiant.data import sample_blocks

    blocks = sample_blocks(tokenizer, "corpus:train", 32, 4, 0)
    return collect_input_statistics(model, {"m": module}, blocks, 2, "test")["m"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_nm_masks_have_exactly_n_nonzeros_in_every_m(tokenizer, method, nm):
    model = make_model(len(tokenizer))
    prune(model, PruneConfig(structure="unstructured", sparsity_method=method, nm=nm, **SMALL), Context(tokenizer=tokenizer))
    n, m = (int(v) for v in nm.split(":"))
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            groups = (linear.weight != 0).reshape(linear.weight.shape[0], -1, m).sum(-1)
            assert (groups == n).all()
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert metrics["sparsity"] == pytest.approx(1 - n / m, abs=1e-3)
    assert set(metrics["density"].values()) == {n / m}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_hits_the_target_sparsity_in_every_layer(tokenizer, method):
    model = make_model(len(tokenizer))
    x = torch.randint(0, len(tokenizer), (1, 8))
    prune(model, PruneConfig(structure="unstructured", sparsity_method=method, sparsity=0.5, **SMALL), Context(tokenizer=tokenizer))
    density = artifact.lineage(model)["stages"][-1]["metrics"]["density"]
    assert len(density) == 4 * 7 and all(abs(d - 0.5) < 0.02 for d in density.values())
    assert model.config.intermediate_size == 128  # shapes unchanged: sparsity does not shrink the config
    assert torch.isfinite(model(x).logits).all()


def test_wanda_keeps_the_weights_with_large_inputs_and_magnitude_the_large_weights(tokenizer):
    model = make_model(len(tokenizer))
    down = decoder_layers(model)[0].mlp.down_proj
    stats = _layer_stats(tokenizer, model, down)
    w = down.weight.detach().clone()
    norms = stats.gram.diagonal().sqrt().float()
    by_hand = torch.zeros_like(w, dtype=torch.bool)
    scores = w.abs() * norms
    by_hand.scatter_(1, scores.topk(64, dim=1).indices, True)  # keep the top half of every row
    assert torch.equal(SPARSITY_METHODS.get("wanda")(w, stats, 0.5, None, 0.0) != 0, by_hand)
    kept = SPARSITY_METHODS.get("magnitude")(w, None, 0.5, None, 0.0) != 0
    assert w.abs()[kept].min() >= w.abs()[~kept].max()


def test_sparsegpt_update_leaves_less_output_error_than_masking_alone(tokenizer):
    model = make_model(len(tokenizer))
    down = decoder_layers(model)[1].mlp.down_proj
    stats = _layer_stats(tokenizer, model, down)
    w = down.weight.detach().clone()
    g = stats.second_moment.float()

    def error(new):
        d = (w - new).double()
        return (d @ g.double() * d).sum().item()

    for nm in (None, (2, 4)):
        sparse = SPARSITY_METHODS.get("sparsegpt")(w, stats, 0.5, nm, 0.01)
        masked_only = w * (sparse != 0)
        assert error(sparse) < 0.8 * error(masked_only)
        assert error(sparse) < error(SPARSITY_METHODS.get("wanda")(w, stats, 0.5, nm, 0.0))


def test_nm_with_an_indivisible_input_dimension_fails(tokenizer):
    model = make_model(len(tokenizer))
    with pytest.raises(ConfigError, match="not divisible by M=7"):
        prune(model, PruneConfig(structure="unstructured", nm="3:7", **SMALL), Context(tokenizer=tokenizer))
    with pytest.raises(ConfigError, match="0 < N < M"):
        PruneConfig(structure="unstructured", nm="4:2").validate("prune")
    with pytest.raises(ConfigError, match="sparsity: must be in"):
        PruneConfig(structure="unstructured", sparsity=1.0).validate("prune")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibrates_each_layer_on_the_already_sparsified_prefix(tokenizer, method):
    """The sequential result equals doing it by hand: for each layer in turn, gather its inputs on the model
    whose earlier layers are already sparse, then sparsify that layer."""
    from minigiant.prune.verb import calibration_blocks

    config = PruneConfig(structure="unstructured", sparsity_method=method, sparsity=0.5, sequential=True, **SMALL)
    model, by_hand = make_model(len(tokenizer)), make_model(len(tokenizer))
    prune(model, config, Context(tokenizer=tokenizer))
    blocks = calibration_blocks(tokenizer, config, 0)
    sparsify = SPARSITY_METHODS.get(method)
    for layer in decoder_layers(by_hand):
        inputs = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "down": layer.mlp.down_proj}
        stats = collect_input_statistics(by_hand, inputs, blocks, SMALL["batch_size"], "test")
        readers = {"q": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate": ("gate_proj", "up_proj"), "down": ("down_proj",)}
        with torch.no_grad():
            for key, names in readers.items():
                for name in names:
                    linear = getattr(layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, name)
                    linear.weight.data = sparsify(linear.weight.data, stats[key], 0.5, None, config.ridge)
    one_shot = make_model(len(tokenizer))
    prune(one_shot, PruneConfig(structure="unstructured", sparsity_method=method, sparsity=0.5, sequential=False, **SMALL), Context(tokenizer=tokenizer))
    for a, b in zip(model.parameters(), by_hand.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    # the first layer sees the same input either way; the last one sees the sparse prefix's output
    first, last = (lambda m: decoder_layers(m)[0].mlp.down_proj.weight, lambda m: decoder_layers(m)[-1].mlp.down_proj.weight)
    assert torch.allclose(first(model), first(one_shot), atol=1e-5)
    assert not torch.allclose(last(model), last(one_shot), atol=1e-3)
    assert artifact.lineage(model)["stages"][-1]["settings"]["sequential"] is True


def test_sparsegpt_is_sequential_unless_told_otherwise():
    assert PruneConfig(structure="unstructured", sparsity_method="sparsegpt").runs_sequential
    assert not PruneConfig(structure="unstructured", sparsity_method="sparsegpt", sequential=False).runs_sequential
    assert not PruneConfig(structure="unstructured", sparsity_method="wanda").runs_sequential
    assert not PruneConfig(structure="width").runs_sequential and PruneConfig(structure="width", sequential=True).runs_sequential


def test_damping_resolves_per_structure_and_reaches_the_refit(tokenizer, monkeypatch):
    from minigiant.prune import verb

    assert PruneConfig(structure="width").ridge == 0.001 and PruneConfig(structure="balanced").ridge == 0.001
    assert PruneConfig(structure="unstructured", sparsity_method="sparsegpt").ridge == 0.01
    assert PruneConfig(structure="depth", linear_patch=True).ridge == 0.01
    assert PruneConfig(structure="width", damp=0.3).ridge == 0.3
    with pytest.raises(ConfigError, match="damp"):
        PruneConfig(structure="width", damp=-1.0).validate("prune")
    seen, real = [], verb.prune_width
    monkeypatch.setattr(verb, "prune_width", lambda *args: seen.append(args[-1]) or real(*args))
    model = make_model(len(tokenizer))
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=0.9, multiple_of=1, **SMALL), Context(tokenizer=tokenizer))
    assert seen == [0.001]
    assert artifact.lineage(model)["stages"][-1]["metrics"]["damp"] == 0.001  # the resolved value is recorded


def test_sparse_packing_layout_by_hand():
    from minigiant.quantize.serialization import pack_sparse, unpack_sparse

    w = torch.tensor([[0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 3.0]])  # 9 elements: two mask bytes
    mask, values = pack_sparse(w)
    assert mask.tolist() == [0b10000010, 0b00000001]  # bit k of byte i is element 8i + k
    assert values.tolist() == [1.5, 2.0, 3.0]
    assert torch.equal(unpack_sparse(mask, values, [1, 9]), w)
    with pytest.raises(ValueError, match="3 nonzeros but 2 values"):
        unpack_sparse(mask, values[:2], [1, 9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_model_is_stored_smaller_and_reloads_exactly(tmp_path, tokenizer, dtype):
    import minigiant
    from minigiant.quantize.serialization import WEIGHTS_FILE

    model = make_model(len(tokenizer))
    prune(model, PruneConfig(structure="unstructured", sparsity_method="wanda", sparsity=0.5, **SMALL), Context(tokenizer=tokenizer))
    model.to(dtype)
    sparse_dir = artifact.save(model, tokenizer, tmp_path / "sparse")
    lineage = artifact.read_lineage(sparse_dir)["sparse_storage"]
    decoder = {n: t for n, t in model.state_dict().items() if ".layers." in n and t.dim() == 2}
    assert lineage["matrices"] == len(decoder) == 4 * 7
    dense_bytes = sum(t.numel() * t.element_size() for t in decoder.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in decoder.values())
    assert nonzero == dense_bytes // dtype.itemsize // 2  # 50% in every matrix
    # mask: one bit per weight; values: the nonzeros at their own width
    assert lineage["dense_bytes"] == dense_bytes
    assert lineage["stored_bytes"] == sum(-(-t.numel() // 8) for t in decoder.values()) + nonzero * dtype.itemsize
    assert not (sparse_dir / "model.safetensors").exists() and (sparse_dir / WEIGHTS_FILE).is_file()

    model.minigiant_lineage = {"format": 1, "stages": []}  # the same weights, written dense for comparison
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir, safe_serialization=True)
    saved = artifact.weights_size_bytes(dense_dir) - artifact.weights_size_bytes(sparse_dir)
    assert saved == pytest.approx(dense_bytes - lineage["stored_bytes"], abs=20_000)  # headers differ

    reloaded, _ = minigiant.load(sparse_dir, dtype=str(dtype).removeprefix("torch."))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert all(p.requires_grad for p in reloaded.parameters())  # distillation can train it


def test_a_dense_model_keeps_the_transformers_layout(tmp_path, tokenizer, tiny_model):
    path = artifact.save(tiny_model, tokenizer, tmp_path / "dense")
    assert (path / "model.safetensors").is_file()
    assert "sparse_storage" not in artifact.read_lineage(path)


def test_a_truncated_sparse_matrix_is_a_load_error(tmp_path, tokenizer):
    import minigiant
    from safetensors.torch import load_file, save_file

    from minigiant.errors import ModelLoadError
    from minigiant.quantize.serialization import WEIGHTS_FILE

    model = make_model(len(tokenizer))
    prune(model, PruneConfig(structure="unstructured", sparsity_method="magnitude", sparsity=0.5, **SMALL), Context(tokenizer=tokenizer))
    path = artifact.save(model, tokenizer, tmp_path / "sparse")
    from safetensors import safe_open

    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path / WEIGHTS_FILE)
    name = next(n for n in tensors if n.endswith(".sparse_values"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path / WEIGHTS_FILE, metadata=metadata)
    with pytest.raises(ModelLoadError, match="sparse matrix is incomplete"):
        minigiant.load(path)


def test_owl_sparsities_by_hand():
    from minigiant.prune.verb import owl_sparsities

    # ratios 0, 1, 3 scale to 0, 2/3·0.1, 0.2 (mean 0.0889): densities 0.5 - 0.0889, 0.5 - 0.0222, 0.5 + 0.1111
    got = owl_sparsities([0.0, 1.0, 3.0], 0.5, 0.1)
    assert got == pytest.approx([0.588889, 0.522222, 0.388889], abs=1e-6)
    assert sum(got) / 3 == pytest.approx(0.5)
    assert owl_sparsities([0.2, 0.2], 0.6, 0.1) == pytest.approx([0.6, 0.6])  # no spread: uniform


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_keeps_more_weights_in_the_layer_with_outliers(tokenizer, method):
    model = make_model(len(tokenizer))
    with torch.no_grad():
        for linear in decoder_layers(model)[2].modules():
            if isinstance(linear, torch.nn.Linear):
                linear.weight[:, :3] *= 40  # a few input channels far above the rest: Wanda-score outliers
    config = PruneConfig(structure="unstructured", sparsity_method=method, sparsity=0.5, sparsity_profile="owl", owl_lambda=0.1, **SMALL)
    prune(model, config, Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    ratios, layer_sparsity = metrics["owl_outlier_ratio"], metrics["layer_sparsity"]
    assert max(range(4), key=ratios.__getitem__) == 2
    assert min(range(4), key=layer_sparsity.__getitem__) == 2
    assert sum(layer_sparsity) / 4 == pytest.approx(0.5, abs=1e-4)
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02)  # each row rounds its count of zeros down
    layer2 = [d for name, d in metrics["density"].items() if name.startswith("layers.2.")]
    assert min(layer2) > 0.5 + 0.05  # the outlier layer keeps clearly more than half


def test_owl_errors():
    with pytest.raises(ConfigError, match="N:M pattern fixes"):
        PruneConfig(structure="unstructured", nm="2:4", sparsity_profile="owl").validate("prune")
    with pytest.raises(ConfigError, match=r"owl_lambda: must be in \[0, 0.1\]"):
        PruneConfig(structure="unstructured", sparsity=0.8, sparsity_profile="owl", owl_lambda=0.2).validate("prune")
    with pytest.raises(ConfigError, match="sparsity_profile: unknown 'global'"):
        PruneConfig(structure="unstructured", sparsity_profile="global").validate("prune")
