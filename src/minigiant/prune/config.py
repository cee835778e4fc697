"""PruneConfig: one config for every pruning family (depth, width, balanced, unstructured / N:M).

The recipe keys of the first release (``method: block_influence``, ``target: 0.6``) keep their meaning:
``structure`` defaults to ``depth``, so an old recipe prunes exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import field
from ..errors import ConfigError

WIDTH_DAMP = 0.001  # PruneConfig.ridge for width refits (BENCHMARKS.md, one-shot pruning, 2026-12-02)

STRUCTURES = ("depth", "width", "balanced", "unstructured")
WIDTH_PARTS = ("mlp", "mlp+heads", "heads")
SPARSITY_PROFILES = ("uniform", "owl")
WIDTH_PROFILES = ("uniform", "sensitivity")


@dataclass
class PruneConfig:
    method: str = field("block_influence", help="how layers are chosen (depth and balanced): block_influence | angular_block")
    target: float = field(0.6, help="fraction of the decoder layers' parameters to keep (0 < target ≤ 1); with the final norm these are the non-embedding parameters")
    budget: str | int | float | None = field(None, help="overrides target: total parameters to keep ('90M', 90000000), a percentage of the non-embedding parameters ('60%'), or a size ('300MB' in the model's dtype)")
    structure: str = field("depth", help="what is removed: depth (whole layers) | width (MLP neurons, attention heads) | balanced (both) | unstructured (single weights, or N:M)")
    linear_patch: bool = field(False, help="depth and balanced: replace each run of removed layers by a linear map fitted on calibration activations and folded into the layer before it (ReplaceMe)")
    width_parts: str = field("mlp+heads", help="width and balanced: what loses width: mlp | heads | mlp+heads")
    hidden: float | None = field(None, help="width and balanced: fraction of the hidden size (residual/embedding channels) to keep, Minitron-style; shrinks the embedding, every layer and the head; rounded down to a multiple of the head count (and of multiple_of where that costs < 10%) (null: keep all)")
    width_profile: str = field("uniform", help="width and balanced: how many MLP neurons each layer keeps: uniform (all the same: a config plain transformers loads) | sensitivity (the same total, spread by each layer's measured effect on the output: the layer-by-layer KL of pruning it alone, ~1 min; per-layer widths need minigiant.load). Measured at 60% kept: one-shot WikiText-2 123 -> 111, books 89 -> 71")
    heads: float | None = field(None, help="fraction of query heads to keep in each KV group (null: as close to the target as the group size allows)")
    importance: str = field("activation", help="width: how neurons and heads are ranked: activation | magnitude_l1 | magnitude_l2 | wanda | taylor | fluctuation | obs (greedy, refit-aware: pairs with reconstruct lstsq)")
    reconstruct: str = field("lstsq", help="width: how the output projection compensates the removal: none | bias (FLAP) | lstsq (ridge refit on calibration activations)")
    refit_steps: int = field(0, help="width and balanced: after the MLPs are pruned and reconstructed, train each one alone (gate, up, down) for this many Adam steps towards the unpruned model's MLP output, on its MLP inputs cached from the calibration pass (block-local healing, no full forward per step; 1 in 8 calibration blocks held out, the best held-out weights kept). 0: off. Needs tokens: 32 blocks of 512 overfit, 64 do not. Measured at 60% kept with 64 blocks: 200 steps, one-shot WikiText-2 ppl 126.6 -> 99.8")
    refit_lr: float = field(1e-3, help="refit_steps: Adam learning rate")
    refit_batch_tokens: int = field(1024, help="refit_steps: calibration tokens per step")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="width and balanced: the statistics pass and the MLP refit in float32 or under bfloat16 autocast (float32 weights; statistics accumulated in float32/float64, the refit's held-out check in float32); auto: bf16 where the CPU multiplies it natively (AMX/AVX512-BF16), else fp32")
    multiple_of: int = field(32, help="width: round the kept MLP neurons down to a multiple of this, so that quantization groups (32) and CPU kernels divide them; 1 = as close to the budget as possible")
    sequential: Optional[bool] = field(None, help="prune layer by layer on the stream the already-pruned layers produce (~2 forward passes). width: refit each layer towards the teacher's hidden states (corrects accumulated error); unstructured wanda/sparsegpt: calibrate each layer's mask and update on that stream, as the papers do. null: on for sparsegpt (measured: 50% 71.8 -> 67.7 ppl, 2:4 248 -> 184), off otherwise")
    steps: int = field(1, help="depth, width and balanced: prune in this many steps to geometrically spaced targets (0.6 in 2: 0.775, then 0.6), each ranking and refitting on calibration statistics of the model the previous step left (hidden and share act in the last step)")
    share: int = field(0, help="depth, width and balanced: after pruning, this many pairs of adjacent layers share projections: the second layer of each runs the first one's (least block influence first; stored once; needs minigiant.load)")
    damp: Optional[float] = field(None, help="ridge damping of the lstsq refit, the linear patch and SparseGPT, as a fraction of the mean diagonal of X^T X. null: 0.001 for width and balanced (measured at 60% kept: 0.01 198 -> 0.001 181 -> 0.0001 179 one-shot ppl), 0.01 otherwise (SparseGPT's)")
    sparsity: float = field(0.5, help="unstructured: fraction of each layer's weights set to zero (ignored when nm is set)")
    sparsity_method: str = field("wanda", help="unstructured: magnitude | wanda | sparsegpt")
    nm: str | int | None = field(None, help="unstructured: semi-structured N:M pattern such as '2:4' (N nonzeros in every M consecutive input weights)")
    sparsity_profile: str = field("uniform", help="unstructured: how the sparsity is spread over the layers: uniform (every layer the same) | owl (layers with more activation outliers keep more weights, Yin et al. 2024; the mean stays `sparsity`)")
    owl_m: float = field(5.0, help="owl: a weight is an outlier when its Wanda score |W|·‖x‖ exceeds this many times its layer's mean score")
    owl_lambda: float = field(0.08, help="owl: the layers' sparsities spread over sparsity ± this (0.08: the OWL paper's LLaMA setting)")
    calibration_text: str = field("corpus:train", help="text spec for calibration: corpus[:train|heldout], a .txt file/folder, samples (the model's own free-running samples: no data needed, cached), or a mix such as corpus:train+samples (equal shares)")
    calibration_blocks: int = field(16, help="number of calibration blocks")
    block_size: int = field(256, help="tokens per calibration block")
    batch_size: int = field(4, help="calibration blocks per forward pass")

    @property
    def runs_sequential(self) -> bool:
        """``sequential`` with null resolved: SparseGPT runs sequentially unless told not to."""
        return self.sequential if self.sequential is not None else (self.structure == "unstructured" and self.sparsity_method == "sparsegpt")

    @property
    def bf16(self) -> bool:
        """``precision`` with auto resolved: whether the width statistics pass and the MLP refit run under bf16 autocast."""
        from ..hardware import resolve_precision

        return resolve_precision(self.precision) == "bf16"

    @property
    def ridge(self) -> float:
        """``damp`` with null resolved: the width refits want little damping (16k calibration tokens pin a
        704-dimensional least-squares fit well), SparseGPT the paper's 0.01."""
        if self.damp is not None:
            return self.damp
        return WIDTH_DAMP if self.structure in ("width", "balanced") else 0.01

    def validate(self, path: str) -> None:
        from .depth import DEPTH_METHODS
        from .importance import IMPORTANCE
        from .reconstruct import RECONSTRUCT
        from .sparsity import SPARSITY_METHODS, parse_nm

        if self.structure not in STRUCTURES:
            from ..errors import did_you_mean

            raise ConfigError(f"{path}.structure: unknown {self.structure!r}; {did_you_mean(self.structure, STRUCTURES)}choose one of: {', '.join(STRUCTURES)}")
        if self.width_parts not in WIDTH_PARTS:
            raise ConfigError(f"{path}.width_parts: unknown {self.width_parts!r}; choose one of: {', '.join(WIDTH_PARTS)}")
        if self.multiple_of < 1:
            raise ConfigError(f"{path}.multiple_of: must be a positive number of neurons (1: no rounding), got {self.multiple_of}")
        if self.structure in ("depth", "balanced"):
            DEPTH_METHODS.get(self.method)
        if self.structure in ("width", "balanced"):
            IMPORTANCE.get(self.importance)
            RECONSTRUCT.get(self.reconstruct)
        if self.structure == "unstructured":
            SPARSITY_METHODS.get(self.sparsity_method)
            if self.nm is not None:
                parse_nm(self.nm, f"{path}.nm")
            elif not 0 <= self.sparsity < 1:
                raise ConfigError(f"{path}.sparsity: must be in [0, 1), the fraction of weights set to zero; got {self.sparsity}")
            if self.sparsity_profile not in SPARSITY_PROFILES:
                raise ConfigError(f"{path}.sparsity_profile: unknown {self.sparsity_profile!r}; choose one of: {', '.join(SPARSITY_PROFILES)}")
            if self.sparsity_profile == "owl":
                if self.nm is not None:
                    raise ConfigError(f"{path}.sparsity_profile: owl varies the sparsity per layer, which an N:M pattern fixes; drop nm or use sparsity_profile uniform")
                limit = min(self.sparsity, 1 - self.sparsity) / 2  # a layer can move by up to 2·lambda from the mean
                if not 0 <= self.owl_lambda <= limit:
                    raise ConfigError(f"{path}.owl_lambda: must be in [0, {limit:g}] at sparsity {self.sparsity:g}, so every layer's sparsity stays in [0, 1]; got {self.owl_lambda}")
                if self.owl_m <= 0:
                    raise ConfigError(f"{path}.owl_m: must be positive (a multiple of the mean score), got {self.owl_m}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"{path}.target: must be in (0, 1], the fraction of non-embedding parameters to keep; got {self.target}")
        if self.hidden is not None and (not 0 < self.hidden <= 1 or self.structure not in ("width", "balanced")):
            raise ConfigError(f"{path}.hidden: must be in (0, 1], the fraction of hidden channels to keep, with structure width or balanced; got {self.hidden} with {self.structure}")
        if self.share < 0 or (self.share and self.structure == "unstructured"):
            raise ConfigError(f"{path}.share: must be a number of layer pairs ≥ 0, with structure depth, width or balanced; got {self.share} with {self.structure}")
        if self.steps < 1 or (self.steps > 1 and self.structure == "unstructured"):
            raise ConfigError(f"{path}.steps: must be at least 1, and 1 with structure unstructured; got {self.steps} with {self.structure}")
        if self.heads is not None and not 0 < self.heads <= 1:
            raise ConfigError(f"{path}.heads: must be in (0, 1], the fraction of query heads to keep; got {self.heads}")
        if self.damp is not None and not 0 <= self.damp < 10:
            raise ConfigError(f"{path}.damp: must be in [0, 10), a fraction of the mean diagonal; got {self.damp}")
        if self.width_profile not in WIDTH_PROFILES:
            raise ConfigError(f"{path}.width_profile: unknown {self.width_profile!r}; choose one of: {', '.join(WIDTH_PROFILES)}")
        if self.width_profile == "sensitivity" and (self.structure not in ("width", "balanced") or "mlp" not in self.width_parts or self.runs_sequential or self.share):
            raise ConfigError(f"{path}.width_profile: sensitivity spreads MLP neurons over the layers of a one-shot width prune: it needs structure width or balanced with mlp in width_parts, sequential off and share 0; got {self.structure}/{self.width_parts}, sequential {self.runs_sequential}, share {self.share}")
        if self.refit_steps < 0 or (self.refit_steps and (self.structure not in ("width", "balanced") or "mlp" not in self.width_parts)):
            raise ConfigError(f"{path}.refit_steps: must be ≥ 0, and 0 unless structure is width or balanced with MLPs in width_parts; got {self.refit_steps} with {self.structure}/{self.width_parts}")
        if self.refit_steps and not (self.refit_lr > 0 and self.refit_batch_tokens >= 1 and self.calibration_blocks >= 2):
            raise ConfigError(f"{path}.refit_steps: needs refit_lr > 0, refit_batch_tokens ≥ 1 and calibration_blocks ≥ 2 (one in eight is held out); got {self.refit_lr}, {self.refit_batch_tokens}, {self.calibration_blocks}")
        for name in ("calibration_blocks", "block_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
