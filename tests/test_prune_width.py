"""Width pruning, importance scores, reconstruction and the budget solver on tiny random Llama models."""

import copy
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.errors import BudgetError, ConfigError, DataError
from minigiant.models.architecture import decoder_layers, non_embedding_parameters
from minigiant.prune import IMPORTANCE, RECONSTRUCT, PruneConfig, prune
from minigiant.prune.budget import decoder_parameters, keep_fraction
from minigiant.prune.calibration import collect_input_statistics, collect_taylor
from minigiant.prune.reconstruct import relative_error

SMALL = dict(multiple_of=1, calibration_blocks=4, block_size=32, batch_size=2, precision="fp32")  # the same numbers on every CPU


def _blocks(tokenizer, n=4, size=32):
    from minigiant.data import sample_blocks

    return sample_blocks(tokenizer, "corpus:train", size, n, 0)


def _plant_dead_neuron(model, layer=0, neuron=5):
    mlp = decoder_layers(model)[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[neuron] = 0
        mlp.up_proj.weight[neuron] = 0
        mlp.down_proj.weight[:, neuron] = 0


def _capture_inputs(model, module, blocks):
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        model(blocks, use_cache=False)
    handle.remove()
    return torch.cat(seen)


def test_the_calibration_pass_skips_the_output_head_but_not_what_a_hook_on_it_sees(tokenizer):
    from minigiant.prune.calibration import run_with_hooks

    model = make_model(len(tokenizer))
    blocks = _blocks(tokenizer)
    head = model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    stats = collect_input_statistics(model, {"down": decoder_layers(model)[1].mlp.down_proj}, blocks, 2, "test")["down"]
    assert calls == [1, 1] and stats.count == blocks.numel()  # the head ran on the last position of each batch only
    calls.clear()
    handle.remove()
    run_with_hooks(model, blocks, 2, "test", {head: lambda m, i, o: calls.append(i[0].shape[1])})
    assert calls == [32, 32]  # hooked: every position, as the hook expects


@pytest.mark.parametrize("name", IMPORTANCE.names())
def test_every_score_ranks_a_planted_dead_neuron_last(tokenizer, name):
    model = make_model(len(tokenizer))
    _plant_dead_neuron(model, neuron=5)
    mlp = decoder_layers(model)[0].mlp
    blocks = _blocks(tokenizer)
    stats = collect_input_statistics(model, {"down": mlp.down_proj}, blocks, 2, "test")
    if name == "taylor":
        collect_taylor(model, {"down": mlp.down_proj}, stats, blocks, 2)
    scores = IMPORTANCE.get(name)(mlp.down_proj.weight, [mlp.gate_proj.weight, mlp.up_proj.weight], stats["down"])
    assert scores.shape == (128,)
    assert scores.argmin().item() == 5


def test_scores_match_their_formulas_computed_by_hand(tokenizer):
    model = make_model(len(tokenizer))
    mlp = decoder_layers(model)[1].mlp
    blocks = _blocks(tokenizer)
    stats = collect_input_statistics(model, {"down": mlp.down_proj}, blocks, 2, "test")["down"]
    x = _capture_inputs(model, mlp.down_proj, blocks)  # [tokens, 128]
    w, g, u = (p.weight.double() for p in (mlp.down_proj, mlp.gate_proj, mlp.up_proj))
    expected = {
        "activation": x.abs().mean(0),
        "magnitude_l1": w.abs().sum(0) + g.abs().sum(1) + u.abs().sum(1),
        "magnitude_l2": (w**2).sum(0) + (g**2).sum(1) + (u**2).sum(1),
        "wanda": w.abs().sum(0) * x.norm(dim=0),
        "fluctuation": x.var(0, unbiased=False) * (w**2).sum(0),
    }
    for name, value in expected.items():
        got = IMPORTANCE.get(name)(mlp.down_proj.weight, [mlp.gate_proj.weight, mlp.up_proj.weight], stats)
        assert torch.allclose(got.double(), value, rtol=1e-4, atol=1e-7), name


def test_taylor_score_is_the_first_order_loss_change_per_sequence(tokenizer):
    model = make_model(len(tokenizer))
    down = decoder_layers(model)[0].mlp.down_proj
    blocks = _blocks(tokenizer, n=2)
    stats = collect_input_statistics(model, {"d": down}, blocks, 2, "test")
    collect_taylor(model, {"d": down}, stats, blocks, 2)
    held = {}

    def hook(m, i):
        held["x"] = i[0].detach().requires_grad_(True)
        return (held["x"],)

    handle = down.register_forward_pre_hook(hook)
    loss = model(blocks, labels=blocks).loss * blocks.numel()
    (grad,) = torch.autograd.grad(loss, [held["x"]])
    handle.remove()
    by_hand = (grad * held["x"]).detach().sum(1).abs().sum(0).double()  # |sum over tokens| per sequence, summed
    assert torch.allclose(stats["d"].taylor, by_hand, rtol=1e-4, atol=1e-8)


def test_refit_leaves_less_output_error_than_dropping_and_the_error_is_exact(tokenizer):
    model = make_model(len(tokenizer))
    down = decoder_layers(model)[2].mlp.down_proj
    blocks = _blocks(tokenizer)
    stats = collect_input_statistics(model, {"d": down}, blocks, 2, "test")["d"]
    x = _capture_inputs(model, down, blocks)
    w = down.weight.detach()
    keep = torch.arange(0, 128, 2)  # half the neurons
    errors = {}
    for name in RECONSTRUCT.names():
        new_w, bias = RECONSTRUCT.get(name)(w, keep, stats, 1e-6)
        errors[name] = relative_error(w, keep, new_w, bias, stats)
        target, approx = x @ w.double().T, x[:, keep] @ new_w.double().T + (0 if bias is None else bias.double())
        by_hand = ((target - approx) ** 2).sum() / (target**2).sum()
        assert errors[name] == pytest.approx(by_hand.item(), rel=1e-3), name
    assert errors["lstsq"] < errors["bias"] < errors["none"]
    # without damping the refit is the ordinary least-squares solution
    solution = torch.linalg.lstsq(x[:, keep], x @ w.double().T).solution.T
    refit, _ = RECONSTRUCT.get("lstsq")(w.double(), keep, stats, 0.0)
    assert torch.allclose(refit, solution, atol=1e-6)


@pytest.mark.parametrize("reconstruct", ["none", "bias", "lstsq"])
def test_width_prune_gives_a_smaller_config_that_plain_transformers_reloads(tmp_path, tokenizer, reconstruct):
    model = make_model(len(tokenizer))
    before = non_embedding_parameters(model)
    prune(model, PruneConfig(structure="width", width_parts="mlp+heads", target=0.6, reconstruct=reconstruct, **SMALL), Context(tokenizer=tokenizer))
    c = model.config
    assert c.num_attention_heads == 2 and c.num_key_value_heads == 2 and c.head_dim == 16  # one query head per KV group
    assert c.intermediate_size < 128
    assert c.mlp_bias == c.attention_bias == (reconstruct == "bias")
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert len(metrics["layer_errors"]) == 4
    assert metrics["mlp_error_mean"] <= metrics["mlp_error_dropped_mean"] + 1e-9
    assert abs(non_embedding_parameters(model) / before - 0.6) < 0.01
    x = torch.randint(0, len(tokenizer), (1, 12))
    expected = model(x).logits
    artifact.save(model, tokenizer, tmp_path / "w")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert reloaded.model.layers[0].mlp.down_proj.weight.shape == (64, c.intermediate_size)
    assert reloaded.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert torch.allclose(reloaded(x).logits, expected, atol=1e-5)
    assert reloaded.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_width_prune_keeps_outputs_where_nothing_was_removed(tokenizer):
    model = make_model(len(tokenizer))
    reference = make_model(len(tokenizer))
    x = torch.randint(0, len(tokenizer), (2, 10))
    prune(model, PruneConfig(structure="width", target=1.0, heads=1.0, reconstruct="lstsq", **SMALL), Context(tokenizer=tokenizer))
    assert torch.equal(model(x).logits, reference(x).logits)
    # pruning only the MLP leaves every attention weight untouched
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=0.7, **SMALL), Context(tokenizer=tokenizer))
    for a, b in zip(decoder_layers(model), decoder_layers(reference)):
        assert torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight)
        assert torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)


def test_planted_dead_neuron_and_head_are_removed(tokenizer):
    model = make_model(len(tokenizer))
    _plant_dead_neuron(model, layer=1, neuron=7)
    attn = decoder_layers(model)[1].self_attn
    with torch.no_grad():  # head 3 (second head of KV group 1) contributes nothing
        attn.q_proj.weight[48:64] = 0
        attn.o_proj.weight[:, 48:64] = 0
    prune(model, PruneConfig(structure="width", target=0.8, heads=0.5, importance="wanda", reconstruct="none", **SMALL), Context(tokenizer=tokenizer))
    kept = artifact.lineage(model)["stages"][-1]["metrics"]["layer_errors"][1]["kept_heads"]
    assert len(kept) == 2 and 2 in kept and 3 not in kept  # one head per KV group; the dead one went
    down = decoder_layers(model)[1].mlp.down_proj.weight
    assert down.shape[1] < 128 and (down.abs().sum(0) > 0).all()  # the dead neuron's zero column went


@pytest.mark.parametrize("structure", ["width", "balanced"])
def test_budget_solver_lands_within_one_percent(tokenizer, structure):
    model = make_model(len(tokenizer), layers=4)
    total = decoder_parameters(model)
    prune(model, PruneConfig(structure=structure, budget="65%", **SMALL), Context(tokenizer=tokenizer))
    assert abs(decoder_parameters(model) / total - 0.65) <= 0.01
    if structure == "balanced":
        assert model.config.num_hidden_layers == 3 and model.config.intermediate_size < 128


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_pruning_in_steps_recalibrates_between_steps_and_lands_on_the_budget(tokenizer, structure):
    from minigiant.prune import verb

    model = make_model(len(tokenizer), layers=6)
    total = decoder_parameters(model)
    calibrated = []
    real = verb.calibration_blocks

    def spy(tokenizer_, config, seed):
        calibrated.append(decoder_parameters(model))  # the size of the model each step calibrates on
        return real(tokenizer_, config, seed)

    verb.calibration_blocks = spy
    try:
        prune(model, PruneConfig(structure=structure, target=0.5, steps=2, **SMALL), Context(tokenizer=tokenizer))
    finally:
        verb.calibration_blocks = real
    steps = artifact.lineage(model)["stages"][-1]["metrics"]["steps"]
    assert [s["kept_fraction"] for s in steps][-1] == pytest.approx(0.5, abs=0.01)
    assert len(steps) == 2 and 0.5 < steps[0]["kept_fraction"] < 1  # about sqrt(0.5) after the first step
    assert calibrated[0] == total and calibrated[1] < total  # the second step calibrated on the pruned model
    assert abs(decoder_parameters(model) / total - 0.5) <= 0.01
    with pytest.raises(ConfigError, match="steps"):
        PruneConfig(structure="unstructured", steps=2).validate("prune")


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_budget_counts_shared_layers_once(tokenizer, structure):
    """With one pair of layers sharing projections, the pruned model still lands on the budget: width keeps
    wider layers, depth keeps one layer more (counted once)."""
    model = make_model(len(tokenizer), layers=6 if structure == "depth" else 4)
    total = decoder_parameters(model)
    target = 0.5 if structure == "depth" else 0.6
    prune(model, PruneConfig(structure=structure, target=target, share=1, **SMALL), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert len(metrics["shared_pairs"]) == 1
    assert abs(decoder_parameters(model) / total - target) <= 0.01
    if structure == "depth":
        assert model.config.num_hidden_layers == 4  # 3 layers' worth of parameters in 4 layers, two of them tied


def test_budget_parses_counts_percentages_and_sizes(tokenizer):
    model = make_model(len(tokenizer))
    total, decoder = sum(p.numel() for p in model.parameters()), decoder_parameters(model)
    fixed = total - decoder
    assert keep_fraction(model, "50%", 0.9) == 0.5
    assert keep_fraction(model, None, 0.9) == 0.9
    assert keep_fraction(model, fixed + decoder // 2, 0.9) == pytest.approx(0.5, abs=1e-4)
    assert keep_fraction(model, f"{(fixed + decoder // 4) * 4 / 1e6}MB", 0.9) == pytest.approx(0.25, abs=1e-4)  # float32
    with pytest.raises(BudgetError, match="above the model's size"):
        keep_fraction(model, total + 1, 0.9)
    with pytest.raises(BudgetError, match="leaves nothing"):
        keep_fraction(model, "0.001M", 0.9)
    with pytest.raises(ConfigError, match="parameter count"):
        keep_fraction(model, "lots", 0.9)


def test_bad_width_input_fails_with_a_clear_message(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).eval()
    with pytest.raises(ConfigError, match="'gpt2' architecture.*supported: llama"):
        prune(gpt2, PruneConfig(structure="width", **SMALL), Context(tokenizer=tokenizer))
    with pytest.raises(ConfigError, match="structure: unknown 'widht'.*did you mean 'width'"):
        PruneConfig(structure="widht").validate("prune")
    with pytest.raises(ConfigError, match="target: must be in"):
        PruneConfig(structure="width", target=1.5).validate("prune")
    with pytest.raises(ConfigError, match="unknown importance score"):
        PruneConfig(structure="width", importance="wandaa").validate("prune")
    short = tmp_path / "short.txt"
    short.write_text("A few words only. " * 40)
    with pytest.raises(DataError, match="fewer than the 50 asked"):
        prune(make_model(len(tokenizer)), PruneConfig(structure="width", calibration_text=str(short), calibration_blocks=50, block_size=32), Context(tokenizer=tokenizer))
    with pytest.raises(BudgetError, match="no MLP neuron"):
        prune(make_model(len(tokenizer)), PruneConfig(structure="width", target=0.05, heads=0.5, **SMALL), Context(tokenizer=tokenizer))


def test_old_recipe_keys_still_mean_depth_pruning():
    from minigiant.config import from_dict

    config = from_dict(PruneConfig, {"method": "block_influence", "target": 0.6}, "prune")
    assert config.structure == "depth" and config.target == 0.6


def _last_hidden_error(model, reference, blocks):
    with torch.no_grad():
        a = model(blocks, output_hidden_states=True).hidden_states[-1]
        b = reference(blocks, output_hidden_states=True).hidden_states[-1]
    return ((a - b) ** 2).sum().item() / (b**2).sum().item()


def test_sequential_refit_tracks_the_teacher_better_than_one_shot_and_reloads(tmp_path, tokenizer):
    reference = make_model(len(tokenizer))
    blocks = _blocks(tokenizer)
    errors = {}
    for sequential in (False, True):
        model = make_model(len(tokenizer))
        prune(model, PruneConfig(structure="width", target=0.6, sequential=sequential, **SMALL), Context(tokenizer=tokenizer))
        errors[sequential] = _last_hidden_error(model, reference, blocks)
    assert errors[True] < errors[False]
    layer_errors = artifact.lineage(model)["stages"][-1]["metrics"]["layer_errors"]
    assert all(e["mlp_error"] <= e["mlp_error_dropped"] and e["attn_error"] <= e["attn_error_dropped"] for e in layer_errors)
    x = torch.randint(0, len(tokenizer), (1, 9))
    artifact.save(model, tokenizer, tmp_path / "s")
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "s")(x).logits, model(x).logits, atol=1e-5)


@pytest.mark.parametrize("reconstruct", ["bias", "lstsq"])
def test_sequential_keeps_outputs_where_nothing_was_removed(tokenizer, reconstruct):
    model, reference = make_model(len(tokenizer)), make_model(len(tokenizer))
    prune(model, PruneConfig(structure="width", target=1.0, heads=1.0, sequential=True, reconstruct=reconstruct, **SMALL), Context(tokenizer=tokenizer))
    x = torch.randint(0, len(tokenizer), (2, 10))
    assert torch.equal(model(x).logits, reference(x).logits)


def test_cli_width_prune_with_a_budget_writes_a_model_plain_transformers_loads(capsys, tmp_path, tiny_model_dir):
    import json

    from minigiant.cli import main

    out = tmp_path / "w"
    code = main(["prune", str(tiny_model_dir), str(out), "--structure", "width", "--budget", "70%", "--reconstruct", "bias",
                 "--sequential", "true", "--calibration-blocks", "2", "--block-size", "32"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] < 128 and config["mlp_bias"] is True
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.gate_proj.bias.abs().sum() == 0  # unused biases are zero
    code = main(["prune", str(tiny_model_dir), str(tmp_path / "x"), "--structure", "unstructured", "--nm", "2:3"])
    assert code == 1 and "not divisible by M=3" in capsys.readouterr().err


def test_width_rounds_kept_neurons_to_a_multiple_that_quantization_groups_divide(tokenizer):
    # The default run's 716 neurons (60% of 1536) could not be quantized with group 32; the default
    # multiple_of=32 keeps 704 there. Tiny model: 128 neurons, 60% asks for ~70, rounded down to 64.
    from minigiant.quantize import QuantizeConfig, quantize

    exact, rounded = make_model(len(tokenizer)), make_model(len(tokenizer))
    small = {k: v for k, v in SMALL.items() if k != "multiple_of"}
    prune(exact, PruneConfig(structure="width", width_parts="mlp", target=0.6, multiple_of=1, **small), Context(tokenizer=tokenizer))
    prune(rounded, PruneConfig(structure="width", width_parts="mlp", target=0.6, **small), Context(tokenizer=tokenizer))
    assert exact.config.intermediate_size % 32 != 0
    assert rounded.config.intermediate_size == exact.config.intermediate_size // 32 * 32
    quantize(rounded, QuantizeConfig(bits=4, group_size=32, ppl_text=None))  # every input width divides by 32
    with pytest.raises(ConfigError, match="multiple_of"):
        PruneConfig(structure="width", multiple_of=0).validate("prune")


def _stats_from(x: torch.Tensor):
    from minigiant.prune.calibration import InputStats

    stats = InputStats.empty(x.shape[1])
    stats.add(x)
    return stats


def test_obs_first_removal_is_the_channel_whose_refit_loses_least(monkeypatch):
    import sys

    from minigiant.prune.reconstruct import least_squares

    importance = sys.modules["minigiant.prune.importance"]
    monkeypatch.setattr(importance, "OBS_STEPS", 10**6)  # one channel per round: the exact greedy path
    monkeypatch.setattr(importance, "OBS_DAMP", 0.0)
    torch.manual_seed(0)
    x, w = torch.randn(500, 12) @ torch.randn(12, 12), torch.randn(6, 12)
    stats = _stats_from(x)
    scores = IMPORTANCE.get("obs")(w, [], stats)
    assert sorted(scores.tolist()) == list(range(1, 13))  # a full removal order
    errors = []
    for j in range(12):
        keep = torch.tensor([i for i in range(12) if i != j])
        errors.append(relative_error(w, keep, least_squares(w, keep, stats, 0.0)[0], None, stats))
    assert scores.argmin().item() == int(torch.tensor(errors).argmin())


def test_obs_sees_a_redundant_neuron_that_per_channel_scores_keep():
    from minigiant.prune.reconstruct import least_squares

    torch.manual_seed(0)
    base = torch.randn(400, 16)
    x = torch.cat([base, base[:, :8] * 1.5 + 0.01 * torch.randn(400, 8)], 1)  # channels 16-23 repeat 0-7, louder
    w = torch.randn(10, 24)
    stats = _stats_from(x)
    errors = {}
    for name in ("obs", "activation"):
        keep = IMPORTANCE.get(name)(w, [], stats).topk(16).indices.sort().values
        errors[name] = relative_error(w, keep, least_squares(w, keep, stats, 0.01)[0], None, stats)
    assert errors["obs"] < 0.01 < errors["activation"]  # obs drops one of each twin; activation drops quiet originals


def test_obs_scores_heads_as_groups_whose_channels_share_one_rank():
    torch.manual_seed(0)
    x, w = torch.randn(300, 16), torch.randn(8, 16)
    w[:, 4:8] *= 0.01  # head 1 writes almost nothing: it goes first
    scores = IMPORTANCE.get("obs")(w, [], _stats_from(x), group_size=4).view(4, 4)
    assert torch.allclose(scores, scores[:, :1].expand(4, 4))
    assert sorted(scores.sum(1).tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert scores.sum(1).argmin().item() == 1


def test_hidden_pruning_removes_a_dead_channel_exactly_and_loads_in_plain_transformers(tmp_path, tokenizer):
    from minigiant.prune.hidden import hidden_statistics, prune_hidden

    model = make_model(len(tokenizer), layers=2, seed=3)
    dead = [5, 17, 40, 63]  # residual channels nothing writes: removing them, with the norm rescale, changes nothing
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    for module in model.modules():  # the rescale is exact up to RMSNorm's epsilon: take it out of the comparison
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
    model.config.rms_norm_eps = 0.0
    ids = torch.randint(0, len(tokenizer), (2, 16))
    before = model(ids).logits
    unscaled = copy.deepcopy(model)
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=1.0, hidden=60 / 64, **SMALL), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert model.config.hidden_size == 60 and metrics["hidden_size"] == 60 and model.config.intermediate_size == 128
    assert metrics["hidden_energy_kept"] == pytest.approx(1.0)
    assert all(r == pytest.approx((64 / 60) ** 0.5, abs=1e-5) for r in metrics["norm_rescale"].values())
    after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-6)
    # Without the rescale every RMSNorm divides by a smaller mean: the outputs move.
    keep = torch.tensor([c for c in range(64) if c not in dead])
    prune_hidden(unscaled, keep, None)
    assert (unscaled(ids).logits - before).abs().max() > 1e-3
    directory = artifact.save(model, tokenizer, tmp_path / "narrow")
    plain = AutoModelForCausalLM.from_pretrained(directory)
    assert plain.model.embed_tokens.weight.shape == (len(tokenizer), 60)
    assert torch.allclose(plain(ids).logits, after, atol=1e-6)
    assert hidden_statistics(model, ids, 2)["norm"]["energy"].shape == (60,)


def test_hidden_pruning_with_mlp_pruning_meets_the_budget_and_rejects_bad_settings(tokenizer):
    model = make_model(len(tokenizer), layers=2, seed=4)
    total = decoder_parameters(model)
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=0.6, hidden=0.75, **SMALL), Context(tokenizer=tokenizer))
    assert model.config.hidden_size == 48 and decoder_parameters(model) <= 0.6 * total
    assert model.config.intermediate_size < 128
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for bad in (dict(structure="depth", hidden=0.5), dict(structure="width", hidden=0.0), dict(structure="width", hidden=1.5)):
        with pytest.raises(ConfigError, match="hidden"):
            PruneConfig(**bad).validate("prune")


def test_parameter_sharing_picks_the_idle_layer_stores_it_once_and_reloads_the_same(tmp_path, tokenizer):
    import minigiant
    from minigiant.prune.share import PROJECTIONS, shared_pairs

    model = make_model(len(tokenizer), layers=4, seed=5)
    layers = model.model.layers
    with torch.no_grad():  # plant a layer that barely changes its input: layer 2 writes almost nothing
        layers[2].self_attn.o_proj.weight.mul_(1e-3)
        layers[2].mlp.down_proj.weight.mul_(1e-3)
    first = layers[1].mlp.down_proj.weight.detach().clone()
    before = decoder_parameters(model)
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=1.0, share=1, **SMALL), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    assert [tuple(p) for p in metrics["shared_pairs"]] == [(1, 2)]
    influence = metrics["share_layer_influence"]
    assert influence[2] == min(influence[1:])
    assert layers[2].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
    assert torch.equal(layers[1].mlp.down_proj.weight, first)  # the second layer runs the first one's weights
    assert layers[2].input_layernorm.weight is not layers[1].input_layernorm.weight  # norms stay per layer
    one_layer = sum(layers[0].get_submodule(n).weight.numel() for n in PROJECTIONS)
    assert decoder_parameters(model) == before - one_layer

    ids = torch.randint(0, len(tokenizer), (2, 12))
    logits = model(ids).logits
    unshared = make_model(len(tokenizer), layers=4, seed=5)
    directory = artifact.save(model, tokenizer, tmp_path / "shared")
    artifact.save(unshared, tokenizer, tmp_path / "plain")
    from safetensors import safe_open

    def stored(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())

    assert stored(directory) == stored(tmp_path / "plain") - one_layer  # one layer of projections fewer on disk
    reloaded, _ = minigiant.load(directory)
    assert shared_pairs(reloaded) == [(1, 2)]
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.allclose(reloaded(ids).logits, logits, atol=1e-6)
    with pytest.raises(BudgetError, match="at most 2"):
        prune(make_model(len(tokenizer), layers=4), PruneConfig(structure="width", target=1.0, share=3, **SMALL), Context(tokenizer=tokenizer))
    with pytest.raises(ConfigError, match="share"):
        PruneConfig(structure="unstructured", share=1).validate("prune")


def test_shared_layers_stay_tied_through_distillation(tokenizer):
    from minigiant.distill import DistillConfig, distill
    from minigiant.prune.share import share_layers, shared_pairs

    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = copy.deepcopy(teacher)
    share_layers(student, [(0, 1), (2, 3)])
    distill(student, DistillConfig(max_steps=3, block_size=32, batch_size=2, lr=1e-3, warmup_steps=1), Context(tokenizer=tokenizer, teacher=teacher))
    assert shared_pairs(student) == [(0, 1), (2, 3)]
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)  # trained, once for both


REFIT = dict(SMALL, calibration_blocks=32, block_size=64, width_parts="mlp", refit_batch_tokens=256)  # fewer tokens overfit


def test_mlp_refit_brings_the_pruned_model_closer_to_the_unpruned_one(tokenizer):
    """The refit trains each pruned MLP towards the unpruned MLP's output: the held-out error it reports equals
    the one computed by hand from the unpruned model's activations, it falls in every layer on average, and the
    last hidden state ends closer to the unpruned model's than with the lstsq refit alone."""
    from minigiant.prune.refit import held_out_blocks

    reference = make_model(len(tokenizer))
    blocks = _blocks(tokenizer)
    models = {}
    for steps in (0, 100):
        models[steps] = make_model(len(tokenizer))
        prune(models[steps], PruneConfig(structure="width", target=0.6, refit_steps=steps, refit_lr=3e-4, **REFIT), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(models[100])["stages"][-1]["metrics"]
    refits = metrics["mlp_refit"]
    assert len(refits) == 4 and all(r["heldout_error"] <= r["heldout_error_before"] for r in refits)
    assert metrics["mlp_refit_heldout_error"] < 0.9 * metrics["mlp_refit_heldout_error_before"]
    # by hand, layer 1: E||mlp_lstsq(x) - mlp_full(x)||^2 / E||mlp_full(x)||^2 on the held-out calibration blocks
    from minigiant.prune.verb import calibration_blocks

    config = PruneConfig(structure="width", target=0.6, refit_steps=100, **REFIT)
    held = calibration_blocks(tokenizer, config, 0)[-held_out_blocks(32):]
    full_mlp, lstsq_mlp = decoder_layers(reference)[1].mlp, decoder_layers(models[0])[1].mlp
    x = _capture_inputs(reference, full_mlp, held).float()
    with torch.no_grad():
        y = full_mlp(x)
        by_hand = ((lstsq_mlp(x) - y).pow(2).sum(1).mean() / y.pow(2).sum(1).mean()).item()
    assert refits[1]["heldout_error_before"] == pytest.approx(by_hand, rel=0.02)  # activations cached in bfloat16
    assert _last_hidden_error(models[100], reference, blocks) < _last_hidden_error(models[0], reference, blocks)


def test_bf16_statistics_and_refit_run_under_autocast_but_accumulate_and_check_in_float(tokenizer):
    from minigiant.prune.calibration import run_with_hooks

    model = make_model(len(tokenizer))
    blocks = _blocks(tokenizer)
    down = decoder_layers(model)[1].mlp.down_proj
    exact, fast = (collect_input_statistics(model, {"d": down}, blocks, 2, "test", bf16=bf16)["d"] for bf16 in (False, True))
    assert fast.gram.dtype == torch.float64 and fast.count == exact.count
    difference = ((fast.gram - exact.gram).norm() / exact.gram.norm()).item()
    assert 0 < difference < 0.05  # the forward ran in bf16, close to float32
    seen = []
    run_with_hooks(model, blocks, 2, "test", {down: lambda m, i, o: seen.append((i[0].dtype, torch.is_autocast_enabled("cpu")))}, bf16=True)
    assert seen == [(torch.bfloat16, False)] * 2  # bf16 inputs, and the hook itself outside autocast
    pruned = make_model(len(tokenizer))
    prune(pruned, PruneConfig(structure="width", target=0.6, refit_steps=100, refit_lr=3e-4, **(REFIT | {"precision": "bf16"})), Context(tokenizer=tokenizer))
    metrics = artifact.lineage(pruned)["stages"][-1]["metrics"]
    assert metrics["precision"] == "bf16" and metrics["mlp_refit_heldout_error"] < 0.9 * metrics["mlp_refit_heldout_error_before"]


@pytest.mark.parametrize("sequential", [False, True])  # activations cached in the statistics pass / a pass of their own
def test_a_diverging_mlp_refit_keeps_the_lstsq_weights(tokenizer, sequential):
    models = []
    for steps in (0, 30):
        models.append(make_model(len(tokenizer)))
        prune(models[-1], PruneConfig(structure="width", target=0.6, refit_steps=steps, refit_lr=1e6, sequential=sequential, **REFIT), Context(tokenizer=tokenizer))
    x = torch.randint(0, len(tokenizer), (2, 10))
    assert torch.equal(models[0](x).logits, models[1](x).logits)
    assert all(r["kept_step"] == 0 for r in artifact.lineage(models[1])["stages"][-1]["metrics"]["mlp_refit"])


@pytest.mark.parametrize("settings", [dict(structure="depth"), dict(structure="width", width_parts="heads"), dict(structure="width", refit_lr=0.0),
                                      dict(structure="width", calibration_blocks=1), dict(structure="width", refit_steps=-1)])
def test_mlp_refit_refuses_settings_it_cannot_honour(settings):
    with pytest.raises(ConfigError, match="refit_steps"):
        PruneConfig(**{"refit_steps": 10, **settings}).validate("prune")

