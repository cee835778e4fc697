"""Per-layer MLP widths (``width_profile: sensitivity``): the prefix errors against the direct refit, the
allocation against exhaustive search, the layer sensitivity against a full forward pass, and a model with
per-layer widths saved, reloaded and quantized exactly. Tiny random Llama models."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import minigiant
from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.errors import ConfigError
from minigiant.models.architecture import decoder_layers, mlp_widths, non_embedding_parameters
from minigiant.prune import PruneConfig, prune
from minigiant.prune.calibration import InputStats
from minigiant.prune.profile import allocate_widths, layer_sensitivity
from minigiant.prune.reconstruct import RECONSTRUCT, prefix_errors, relative_error

SMALL = dict(multiple_of=1, calibration_blocks=8, block_size=32, batch_size=2)


def _blocks(tokenizer, n=4, size=32):
    from minigiant.data import sample_blocks

    return sample_blocks(tokenizer, "corpus:train", size, n, 0)


def test_prefix_errors_equal_the_least_squares_refit_of_each_prefix():
    torch.manual_seed(0)
    x = torch.randn(400, 12) @ torch.randn(12, 12)  # correlated inputs: the refit has something to recover
    stats = InputStats.empty(12)
    stats.add(x)
    weight = torch.randn(5, 12)
    order = torch.randperm(12)
    errors = prefix_errors(weight, order, stats)
    assert errors.shape == (13,) and errors[0].item() == pytest.approx(1.0) and errors[-1].item() == pytest.approx(0.0, abs=1e-9)
    for k in (1, 4, 7, 11):
        keep = order[:k]
        refit, _ = RECONSTRUCT.get("lstsq")(weight.double(), keep, stats, 0.0)
        assert errors[k].item() == pytest.approx(relative_error(weight, keep, refit, None, stats), rel=1e-6, abs=1e-9)
    assert (errors[1:] <= errors[:-1] + 1e-12).all()  # keeping more never loses more


def test_allocation_matches_exhaustive_search_on_convex_costs():
    torch.manual_seed(1)
    for _ in range(5):
        rates = torch.rand(3) + 0.2
        errors = [torch.exp(-r * torch.arange(9, dtype=torch.float64)) * (k := torch.arange(9) < 8) for r in rates]  # full width 8: no error
        sensitivity = torch.rand(3).tolist()
        widths = allocate_widths(sensitivity, errors, width=4, multiple_of=1, minimum=1)

        def total(ws):
            return sum(s * e[w].item() / e[4].item() for s, e, w in zip(sensitivity, errors, ws))

        best = min((ws for ws in itertools.product(range(1, 9), repeat=3) if sum(ws) <= 12), key=total)
        assert sum(widths) == 12 and total(widths) == pytest.approx(total(best))


def test_allocation_keeps_multiples_and_the_minimum():
    errors = [torch.linspace(1, 0, 65, dtype=torch.float64) for _ in range(3)]
    widths = allocate_widths([1.0, 0.0, 0.0], errors, width=32, multiple_of=8, minimum=16)
    assert widths[0] == 64 and widths[1:] == [16, 16]  # what matters keeps all; the rest go to the floor
    with pytest.raises(ValueError, match="exceed the budget"):
        allocate_widths([1.0] * 3, errors, width=8, multiple_of=8, minimum=16)


def test_layer_sensitivity_is_the_kl_of_the_whole_model_with_one_mlp_pruned(tokenizer):
    model = make_model(len(tokenizer))
    blocks = _blocks(tokenizer, n=2)

    def halve(i, mlp):
        with torch.no_grad():
            mlp.down_proj.weight[:, ::2] = 0
        return mlp

    unchanged = layer_sensitivity(model, blocks, lambda i, mlp: mlp)
    assert unchanged == pytest.approx([0.0] * 4, abs=1e-6)
    measured = layer_sensitivity(model, blocks, halve)
    with torch.no_grad():
        reference = F.log_softmax(model(blocks).logits.float(), -1)
        for i in (0, 3):
            pruned = copy.deepcopy(model)
            halve(i, decoder_layers(pruned)[i].mlp)
            expected = F.kl_div(F.log_softmax(pruned(blocks).logits.float(), -1), reference, log_target=True, reduction="sum").item() / blocks.numel()
            assert measured[i] == pytest.approx(expected, rel=1e-4)
    assert all(m > 0 for m in measured)


def _silence_layer(model, layer):
    with torch.no_grad():
        decoder_layers(model)[layer].mlp.down_proj.weight.zero_()


def test_sensitivity_profile_moves_neurons_to_the_layers_that_matter_at_the_same_size(tokenizer, tmp_path):
    uniform, profiled = make_model(len(tokenizer)), make_model(len(tokenizer))
    for model in (uniform, profiled):
        _silence_layer(model, 1)  # its MLP writes nothing: pruning it costs nothing
    ctx, groups = Context(tokenizer=tokenizer), SMALL | dict(multiple_of=16)  # widths the int4 groups below divide
    prune(uniform, PruneConfig(structure="width", width_parts="mlp", target=0.6, **groups), ctx)
    prune(profiled, PruneConfig(structure="width", width_parts="mlp", target=0.6, width_profile="sensitivity", **groups), ctx)
    widths = mlp_widths(profiled)
    metrics = artifact.lineage(profiled)["stages"][-1]["metrics"]
    assert widths == metrics["mlp_widths"] and len(metrics["layer_sensitivity"]) == 4
    assert metrics["layer_sensitivity"][1] == pytest.approx(0.0, abs=1e-7) and widths[1] == 16  # the floor: 128 // 8
    assert sum(widths) == 4 * uniform.config.intermediate_size and all(w % 16 == 0 for w in widths)
    assert non_embedding_parameters(profiled) == non_embedding_parameters(uniform)
    assert profiled.config.intermediate_size == max(widths)

    x = torch.randint(0, len(tokenizer), (1, 12))
    expected = profiled(x).logits
    artifact.save(profiled, tokenizer, tmp_path / "p")
    assert artifact.read_lineage(tmp_path / "p")["mlp_widths"] == widths
    reloaded, _ = minigiant.load(tmp_path / "p")
    assert mlp_widths(reloaded) == widths
    assert torch.equal(reloaded(x).logits, expected)

    from minigiant.quantize import QuantizeConfig, quantize

    quantize(reloaded, QuantizeConfig(bits=4, group_size=16, ppl_text=None))
    expected_q = reloaded(x).logits
    artifact.save(reloaded, tokenizer, tmp_path / "q")
    again, _ = minigiant.load(tmp_path / "q")
    assert torch.equal(again(x).logits, expected_q)


def test_per_layer_widths_refuse_what_cannot_describe_them(tokenizer, tmp_path):
    model = make_model(len(tokenizer))
    prune(model, PruneConfig(structure="width", width_parts="mlp", target=0.6, width_profile="sensitivity", **SMALL), Context(tokenizer=tokenizer))
    with pytest.raises(ConfigError, match="per-layer widths"):
        prune(model, PruneConfig(structure="width", width_parts="mlp", target=0.5, **SMALL), Context(tokenizer=tokenizer))
    from minigiant.export import export

    with pytest.raises(ConfigError, match="different widths"):
        export(model, tokenizer, tmp_path / "m.gguf")
    from minigiant.prune.share import share_layers

    widths = mlp_widths(model)
    a = next(i for i in range(3) if widths[i] != widths[i + 1])
    with pytest.raises(ConfigError, match="cannot share"):
        share_layers(model, [(a, a + 1)])
    for bad in (dict(width_profile="wide"), dict(width_profile="sensitivity", structure="depth"), dict(width_profile="sensitivity", structure="width", share=1),
                dict(width_profile="sensitivity", structure="width", sequential=True)):
        with pytest.raises(ConfigError, match="width_profile"):
            PruneConfig(**bad).validate("prune")
