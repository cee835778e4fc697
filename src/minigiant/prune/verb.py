"""The ``prune`` verb: one entry point for depth, width, balanced and unstructured pruning."""

from __future__ import annotations

import dataclasses
import time

import torch

from .. import artifact
from ..context import Context
from ..data import sample_blocks
from ..errors import BudgetError, ConfigError, DataError
from ..models.architecture import decoder_layers, keep_layers, mlp_widths, non_embedding_parameters
from ..progress import log
from .budget import decoder_parameters, depth_share, keep_fraction, sharing_budgets
from .calibration import collect_input_statistics, collect_taylor
from .config import PruneConfig
from .depth import choose_layers
from .patch import fold_patch, linear_patches
from .refit import MLPCapture, capture_mlp_io, refit_mlps
from .sequential import prune_width_sequential, shares_input_with, sparsify_sequential
from .sparsity import SPARSITY_METHODS, check_nm, parse_nm
from .width import _geometry, check_architecture, output_projections, plan_width, prune_width


def calibration_blocks(tokenizer, config: PruneConfig, seed: int) -> torch.Tensor:
    blocks = sample_blocks(tokenizer, config.calibration_text, config.block_size, config.calibration_blocks, seed, what="calibration text")
    if blocks.shape[0] < config.calibration_blocks:
        raise DataError(f"calibration text {config.calibration_text!r} gives only {blocks.shape[0]} blocks of {config.block_size} tokens, fewer than the {config.calibration_blocks} asked; give more text or lower calibration_blocks")
    return blocks


def prune(model, config: PruneConfig = PruneConfig(), ctx: Context | None = None):
    """Prune ``model`` in place as ``config`` says and record what was removed in its lineage."""
    ctx = ctx or Context()
    tokenizer = ctx.require_tokenizer("prune")
    config.validate("prune")
    start = time.perf_counter()
    before = non_embedding_parameters(model)
    metrics: dict = {"non_embedding_params_before": before}
    settings = config  # recorded as asked: "samples", not the cache file it resolves to
    if not (config.structure == "unstructured" and config.sparsity_method == "magnitude" and config.sparsity_profile == "uniform"):
        from ..data.samples import resolve_samples

        # The model's own samples come from the model as given, before any step has pruned it.
        text = resolve_samples(config.calibration_text, model, tokenizer, config.calibration_blocks * config.block_size, ctx.seed)
        if text != config.calibration_text:
            config = dataclasses.replace(config, calibration_text=text)
            metrics["calibration_file"] = text
    if config.structure == "unstructured":
        metrics.update(sparsify(model, config, tokenizer, ctx.seed))
    elif config.steps > 1:
        metrics.update(prune_in_steps(model, config, tokenizer, ctx.seed))
    else:
        metrics.update(prune_structure(model, config, tokenizer, ctx.seed))
    after = non_embedding_parameters(model)
    metrics.update(non_embedding_params_after=after, kept_fraction=round(after / before, 4), seconds=round(time.perf_counter() - start, 1))
    artifact.record_stage(model, "prune", settings=dataclasses.asdict(settings), metrics=metrics)
    return model


def prune_structure(model, config: PruneConfig, tokenizer, seed: int, stats: dict | None = None) -> dict:
    """Depth, width or both, to the budget. ``stats`` (width statistics of this very model) may be passed to
    reuse one calibration pass across several prunings of copies of the same model (the benchmark does)."""
    layers = decoder_layers(model)
    fraction = keep_fraction(model, config.budget, config.target)
    total = decoder_parameters(model)
    budget = round(fraction * total)
    smallest = min(sum(p.numel() for p in layer.parameters()) for layer in layers)
    if config.structure == "depth" and budget < smallest:
        raise BudgetError(f"prune target {fraction:.4g} keeps {budget:,} parameters, less than one decoder layer ({smallest:,}); raise the target")
    if config.structure != "depth":
        check_architecture(model)
        if mlp_widths(model):
            raise ConfigError("prune: this model's MLPs already have per-layer widths (width_profile: sensitivity); width pruning it again is not supported yet: prune the original model once to the final budget, or use structure depth or unstructured")
    blocks = calibration_blocks(tokenizer, config, seed)
    metrics: dict = {"target_fraction": round(fraction, 4)}
    if config.structure in ("depth", "balanced"):
        # Depth alone keeps as many more layers as sharing will take back; balanced lets width absorb it.
        depth_budget = round(depth_share(config.structure, fraction) * total)
        if config.structure == "depth":
            depth_budget = sharing_budgets(model, depth_budget, config.share)[0]
        removed, scores = choose_layers(model, blocks, config.method, depth_budget, config.batch_size)
        keep = [i for i in range(len(layers)) if i not in removed]
        patches = linear_patches(model, removed, blocks, config.batch_size, config.ridge) if config.linear_patch else {}
        for index, patch in patches.items():
            fold_patch(layers[index], patch)
        keep_layers(model, keep)
        metrics.update(removed_layers=removed, kept_layers=keep, layer_scores=scores, patched_layers=sorted(patches))
        stats = None  # the layers moved: statistics of the unpruned model no longer line up
    if config.structure in ("width", "balanced") and config.hidden is not None and config.hidden < 1:
        from .hidden import hidden_scores, hidden_statistics, plan_hidden, prune_hidden

        kept, multiple = plan_hidden(model, config.hidden, config.multiple_of)
        if multiple < config.multiple_of:
            log(f"[yellow]prune: hidden size {kept} (a multiple of the {model.config.num_attention_heads} heads) is a multiple of {multiple}, not of multiple_of {config.multiple_of}; quantize with a group size that divides it")
        hidden_stats = hidden_statistics(model, blocks, config.batch_size)
        scores = hidden_scores(hidden_stats)
        keep = scores.topk(kept).indices.sort().values
        energy = sum(s["energy"] for s in hidden_stats.values())
        ratios = prune_hidden(model, keep, hidden_stats)
        metrics.update(hidden_size=kept, hidden_energy_kept=round((energy[keep].sum() / energy.sum()).item(), 5), norm_rescale=ratios)
        stats = None  # the widths changed: statistics of the unpruned model no longer line up
    if config.structure in ("width", "balanced"):
        # The budget counts each shared tensor once: the layers that keep their own projections are wider.
        intermediate, heads_per_group = plan_width(model, sharing_budgets(model, budget, config.share)[1], config.width_parts, config.heads, config.reconstruct, fraction, config.multiple_of)
        # The refit's targets: the MLPs as they are now, before any neuron is removed; cached in the
        # statistics pass when there is one.
        cached = None
        if not config.runs_sequential and stats is None:
            capture = MLPCapture(model) if config.refit_steps else None
            stats = width_statistics(model, config, blocks, capture.hooks if capture else None)
            cached = capture.result() if capture else None
        elif config.refit_steps:
            cached = capture_mlp_io(model, blocks, config.batch_size)
        widths = intermediate
        if config.width_profile == "sensitivity":
            widths, sensitivity = sensitivity_widths(model, stats, blocks, intermediate, config)
            metrics.update(layer_sensitivity=[round(s, 5) for s in sensitivity], mlp_widths=widths)
        if config.runs_sequential:
            errors = prune_width_sequential(model, blocks, config.batch_size, intermediate, heads_per_group, config.width_parts, config.importance, config.reconstruct, config.ridge)
        else:
            errors = prune_width(model, stats, widths, heads_per_group, config.width_parts, config.importance, config.reconstruct, config.ridge)
        metrics.update(intermediate_size=intermediate, num_attention_heads=model.config.num_attention_heads, layer_errors=errors, damp=config.ridge,
                       precision="bf16" if config.bf16 else "fp32")
        for kind in ("mlp", "attn"):
            if errors and f"{kind}_error" in errors[0]:
                metrics[f"{kind}_error_dropped_mean"] = round(sum(e[f"{kind}_error_dropped"] for e in errors) / len(errors), 5)
                metrics[f"{kind}_error_mean"] = round(sum(e[f"{kind}_error"] for e in errors) / len(errors), 5)
        if cached is not None:
            refits = refit_mlps(model, cached, config.refit_steps, config.refit_lr, config.refit_batch_tokens, seed, config.bf16)
            del cached
            before, after = (sum(r[key] for r in refits) / len(refits) for key in ("heldout_error_before", "heldout_error"))
            log(f"prune: refit {len(refits)} MLPs, {config.refit_steps} steps each: held-out relative output error {before:.4f} -> {after:.4f}")
            metrics.update(mlp_refit=refits, mlp_refit_heldout_error_before=round(before, 5), mlp_refit_heldout_error=round(after, 5))
    if config.share:
        from .share import choose_pairs, share_layers

        pairs, influence = choose_pairs(model, config.share, blocks, config.batch_size)
        share_layers(model, pairs)
        metrics.update(shared_pairs=pairs, share_layer_influence=influence)
    kept = decoder_parameters(model)
    widths = mlp_widths(model)
    log(f"prune: {config.structure} kept {kept:,} of {total:,} decoder parameters ({kept / total:.4f}, target {fraction:.4f}): "
        f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, intermediate {f'{min(widths)}-{max(widths)}' if widths else model.config.intermediate_size}, {model.config.num_attention_heads} query heads")
    return metrics


def sensitivity_widths(model, stats: dict, blocks: torch.Tensor, width: int, config: PruneConfig) -> tuple[list[int], list[float]]:
    """Per-layer MLP widths with as many neurons in all as ``width`` in every layer (``profile.py``), and the
    measured sensitivity of each layer; the model is not changed."""
    from .profile import SENSITIVITY_BLOCKS, allocate_widths, layer_sensitivity
    from .reconstruct import prefix_errors
    from .refit import held_out_blocks
    from .width import added_biases, neuron_order, prune_mlp

    layers = decoder_layers(model)
    names = [f"layers.{i}.mlp.down_proj" for i in range(len(layers))]
    g = _geometry(model)
    mlp_bias = added_biases(g, "mlp", config.reconstruct, width, g["heads"])[0]
    # The blocks the refit holds out (the last ones), at most SENSITIVITY_BLOCKS of them.
    probe = blocks[-min(SENSITIVITY_BLOCKS, held_out_blocks(blocks.shape[0])):]

    def pruned(i, mlp):
        prune_mlp(mlp, stats[names[i]], width, config.importance, config.reconstruct, config.ridge, mlp_bias)
        return mlp

    sensitivity = layer_sensitivity(model, probe, pruned)
    errors = [prefix_errors(layer.mlp.down_proj.weight.data, neuron_order(layer.mlp, stats[name], config.importance), stats[name]) for layer, name in zip(layers, names)]
    full = g["intermediate"]
    minimum = max(config.multiple_of, full // 8 - (full // 8) % config.multiple_of)
    widths = allocate_widths(sensitivity, errors, width, config.multiple_of, min(minimum, width))
    log(f"prune: MLP widths by layer sensitivity, {min(widths)}-{max(widths)} neurons (uniform: {width})")
    return widths, sensitivity


STEP_SUMMARY = ("target_fraction", "removed_layers", "intermediate_size", "num_attention_heads", "mlp_error_mean", "attn_error_mean")


def prune_in_steps(model, config: PruneConfig, tokenizer, seed: int) -> dict:
    """Iterative pruning: ``config.steps`` structural prunings to geometrically spaced fractions of the
    original decoder parameters, each ranking (and refitting) on statistics of the model the previous step
    left, so a later step sees what the earlier ones removed. Hidden-size pruning and sharing act in the last
    step. Returns the last step's metrics plus ``steps``: a summary of every step."""
    total = decoder_parameters(model)
    fraction = keep_fraction(model, config.budget, config.target)
    summaries, metrics = [], {}
    for k in range(1, config.steps + 1):
        last = k == config.steps
        goal = fraction ** (k / config.steps) * total
        step = dataclasses.replace(config, budget=None, target=min(1.0, goal / decoder_parameters(model)), steps=1,
                                   hidden=config.hidden if last else None, share=config.share if last else 0)
        log(f"prune: step {k}/{config.steps}: keep {goal / total:.4f} of the original decoder parameters")
        metrics = prune_structure(model, step, tokenizer, seed)
        summaries.append({key: metrics[key] for key in STEP_SUMMARY if key in metrics} | {"kept_fraction": round(decoder_parameters(model) / total, 4)})
    return {**metrics, "target_fraction": round(fraction, 4), "steps": summaries}


def width_statistics(model, config: PruneConfig, blocks: torch.Tensor, also: dict | None = None) -> dict:
    modules = output_projections(model, config.width_parts)
    stats = collect_input_statistics(model, modules, blocks, config.batch_size, f"prune: calibrating {len(modules)} projections", also, config.bf16)
    if config.importance == "taylor":
        collect_taylor(model, modules, stats, blocks, config.batch_size)
    return stats


def sparsify(model, config: PruneConfig, tokenizer, seed: int, stats: dict | None = None) -> dict:
    """Zero single weights of every decoder linear layer (unstructured or N:M); returns density per layer.
    ``stats`` (one-shot calibration statistics of this very model) may be passed to reuse one pass."""
    nm = parse_nm(config.nm, "prune.nm") if config.nm else None
    layers = decoder_layers(model)
    linears = {f"layers.{i}.{name}": m for i, layer in enumerate(layers) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    if nm:
        for name, m in linears.items():
            check_nm(m.weight, nm[1], name)
    method = SPARSITY_METHODS.get(config.sparsity_method)
    density = {}
    layer_sparsity = [config.sparsity] * len(layers)
    outlier_ratio = None
    if config.sparsity_profile == "owl":
        if stats is None:  # OWL ranks the layers of the dense model, before any is sparsified
            stats = sparsity_statistics(model, config, calibration_blocks(tokenizer, config, seed))
        outlier_ratio = outlier_ratios(model, stats, config.owl_m)
        layer_sparsity = owl_sparsities(outlier_ratio, config.sparsity, config.owl_lambda)
        if config.runs_sequential:
            stats = None  # the sequential pass gathers its own statistics on the sparse prefix

    @torch.no_grad()
    def sparsify_layer(i, layer, layer_stats):
        for name, m in layer.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            s = layer_stats[shares_input_with(name)] if layer_stats is not None else None
            m.weight.data = method(m.weight.data, s, layer_sparsity[i], nm, config.ridge)
            if nm:
                nonzero = (m.weight.data.reshape(m.weight.shape[0], -1, nm[1]) != 0).sum(-1)
                if nonzero.max() > nm[0]:
                    raise RuntimeError(f"layers.{i}.{name}: N:M mask violated ({nonzero.max().item()} nonzeros in a group of {nm[1]}); this is a bug")
            density[f"layers.{i}.{name}"] = round((m.weight.data != 0).float().mean().item(), 4)

    if config.sparsity_method == "magnitude":  # data-free: no calibration, so nothing to run sequentially
        for i, layer in enumerate(layers):
            sparsify_layer(i, layer, None)
    elif config.runs_sequential:
        sparsify_sequential(model, calibration_blocks(tokenizer, config, seed), config.batch_size, sparsify_layer)
    else:
        if stats is None:
            stats = sparsity_statistics(model, config, calibration_blocks(tokenizer, config, seed))
        for i, layer in enumerate(layers):
            sparsify_layer(i, layer, {key.split(".", 2)[2]: value for key, value in stats.items() if key.startswith(f"layers.{i}.")})
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum((m.weight.data == 0).sum().item() for m in linears.values())
    profile = f", OWL: layers at {min(layer_sparsity):.3f}-{max(layer_sparsity):.3f}" if outlier_ratio is not None else ""
    log(f"prune: {config.sparsity_method} {f'{nm[0]}:{nm[1]}' if nm else f'{config.sparsity:.0%} unstructured'}{' (sequential)' if config.runs_sequential and config.sparsity_method != 'magnitude' else ''}{profile}: {zeros / total:.4f} of the decoder weights are zero")
    metrics = {"sparsity": round(zeros / total, 4), "density": density}
    if outlier_ratio is not None:
        metrics |= {"owl_outlier_ratio": [round(r, 5) for r in outlier_ratio], "layer_sparsity": [round(s, 4) for s in layer_sparsity]}
    return metrics


def outlier_ratios(model, stats: dict, m: float) -> list[float]:
    """OWL's layerwise outlier density: the share of a decoder layer's weights (all its linears together)
    whose Wanda score ``|W_ij| · ||x_j||`` exceeds ``m`` times the layer's mean score."""
    ratios = []
    for i, layer in enumerate(decoder_layers(model)):
        scores = torch.cat([
            (linear.weight.detach().double().abs() * stats[f"layers.{i}.{shares_input_with(name)}"].gram.diagonal().sqrt()).reshape(-1)
            for name, linear in layer.named_modules() if isinstance(linear, torch.nn.Linear)])
        ratios.append((scores > m * scores.mean()).double().mean().item())
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lmbda: float) -> list[float]:
    """Per-layer sparsity from outlier ratios (OWL): the ratios, min-max scaled to [0, 2·lmbda] and centred,
    are added to each layer's density ``1 - sparsity``, so the layer with the most outliers keeps
    ``lmbda`` more of its weights than the mean and the one with the fewest ``lmbda`` less (for evenly
    spread ratios); the layers are the same size, so the mean sparsity stays ``sparsity``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lmbda if spread > 0 else torch.zeros_like(r)
    density = 1 - sparsity + scaled - scaled.mean()
    return (1 - density).clamp(0, 1).tolist()


def sparsity_statistics(model, config: PruneConfig, blocks: torch.Tensor) -> dict:
    modules = {f"layers.{i}.{name}": m for i, layer in enumerate(decoder_layers(model)) for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and shares_input_with(name) == name}
    return collect_input_statistics(model, modules, blocks, config.batch_size, f"prune: calibrating {len(modules)} linear layers")
