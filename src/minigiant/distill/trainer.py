"""The distillation loop: the student learns from the teacher's distribution over packed blocks of text and,
with ``chat_fraction`` > 0, over the teacher's own answers to chat prompts (``chat.py``; loss on the answer
tokens only) and, with ``on_policy_fraction`` > 0, over the student's own sampled answers to those prompts
(``on_policy.py``). Logit KD (``kd_weight``), cross-entropy on the data (``ce_weight``), hidden-state and
attention-relation matching (``hidden_weight``, ``attention_weight``; ``features.py``) combine by weight.

It honours a time budget (the cosine schedule is stretched to the number of steps that fit), accumulates
gradients over ``grad_accum`` micro-batches, evaluates held-out perplexity every ``eval_every`` steps (the
curve is saved in the stage metrics), shows progress with rate and ETA, checkpoints every few minutes and on
Ctrl-C, resumes from the last checkpoint to the same weights as an uninterrupted run, and stops on a
NaN/inf loss keeping the last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .. import artifact
from ..config import field
from ..context import Context
from ..data import sample_blocks
from ..errors import ConfigError, TrainingError
from ..hardware import resolve_precision
from ..progress import log, progress
from .checkpoint import Checkpoint
from .features import HIDDEN_LOSSES, FeatureMatcher
from .forward import shared_prefix_layers, split_forward_matches
from .interrupt import StopOnInterrupt
from .losses import LOGIT_LOSSES
from .batches import TrainingData
from .parallel import DataParallel
from .sparsity import SparsityMasks, pruned_unstructured
from .step import StepRunner


@dataclass
class DistillConfig:
    loss: str = field("kl", help="logit loss: kl (teacher‖student) | reverse_kl | symmetric_kl")
    temperature: float = field(1.0, help="softmax temperature applied to both teacher and student logits")
    kd_weight: float = field(1.0, help="weight of the logit distillation loss")
    ce_weight: float = field(0.1, help="weight of the next-token cross-entropy on the training data")
    hidden_weight: float = field(0.0, help="weight of the hidden-state loss between matched layers (0: off)")
    hidden_loss: str = field("mse", help="hidden-state loss: mse (relative squared error) | cosine")
    hidden_layer_map: Optional[list[int]] = field(None, help="teacher layer matched by each student layer; null: from pruning, else spread evenly")
    attention_weight: float = field(0.0, help="weight of the MiniLMv2 attention-relation loss on the last layer (0: off)")
    relation_heads: int = field(4, help="relation heads of the attention-relation loss (must divide the q/k/v widths)")
    text: str = field("corpus:train", help="training text spec: corpus[:train|heldout] or a .txt file/folder")
    chat_fraction: float = field(0.0, help="share of steps trained on the teacher's answers to chat prompts (0: text only, 1: chat only)")
    chat_prompts: str = field("self", help="chat prompts: self (the teacher writes them, Magpie-style) or a .jsonl/.txt file")
    chat_examples: int = field(256, help="how many usable teacher answers to train on: a self-written prompt that did not end within 64 tokens or an empty answer is replaced by another (cached on disk, reused across runs)")
    chat_max_new_tokens: int = field(160, help="longest teacher answer, in tokens")
    chat_temperature: float = field(0.7, help="sampling temperature of the teacher's answers (0: greedy)")
    chat_group_by_length: bool = field(True, help="batch chat examples of similar lengths together (transformers' group_by_length): 99% real tokens instead of 87% with the default chat data")
    chat_batch_size: int = field(64, help="prompts the teacher answers at once (finished answers leave the batch: 64 cost half as much per token as 16 on a 2-core CPU, ~0.6 GB of KV cache)")
    on_policy_fraction: float = field(0.0, help="share of the chat steps on which the student answers the prompts itself (sampled) and learns the teacher's distribution over its own tokens (on-policy KD, GKD; on_policy.py); 0: off")
    on_policy_max_new_tokens: int = field(64, help="longest student answer in an on-policy step, in tokens")
    on_policy_temperature: float = field(1.0, help="sampling temperature of the student's on-policy answers (0: greedy)")
    unlikelihood_weight: float = field(0.0, help="weight of the unlikelihood loss -log(1 - p) on the tokens of the student's on-policy answers that repeat an n-gram it already wrote in that answer (Welleck et al. 2020): the teacher, shown a loop, often continues it; 0: off")
    unlikelihood_ngram: int = field(4, help="n of the repeated n-grams the unlikelihood loss pushes down")
    on_policy_start: float = field(0.0, help="share of the run before on-policy steps begin: of its training time when `minutes` is set, else of its steps (0: from the first step; 0.7: only in the last 30%, once the student answers well enough to learn from its own loops)")
    cache_dir: Optional[str] = field(None, help="where teacher answers are cached; null: $MINIGIANT_CACHE/distill or ~/.cache/minigiant/distill")
    block_size: int = field(256, help="tokens per training sequence (chat examples are cut to it)")
    batch_size: int = field(4, help="sequences per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    lr: float = field(4e-4, help="peak learning rate (AdamW), warmup then cosine decay to 10%")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(10, help="linear warmup steps")
    max_steps: int = field(1000, help="upper bound on optimizer steps (a timed run's cap: `run --minutes` scales it with the time budget)")
    minutes: Optional[float] = field(None, help="time budget in minutes (scaled by `run --minutes`); null: run max_steps")
    train_embeddings: bool = field(False, help="also train the (usually tied) embedding and output head")
    train_only_mlp: bool = field(False, help="train only the decoder layers' MLPs (what width pruning changed); their attention and norms keep the teacher's weights")
    keep_sparsity: Optional[bool] = field(None, help="hold the zeros of sparse weight matrices fixed (gradients masked; sparsity.py), so an unstructured or N:M student stays sparse; null: on when the student's lineage has an unstructured prune")
    grad_clip: float = field(1.0, help="clip the gradient norm to this value (0: off)")
    teacher_precision: Literal["auto", "fp32", "bf16"] = field("auto", help="teacher forward in float32 or bfloat16 (a bf16 copy of its weights); auto: bf16 where the CPU multiplies it natively (AMX/AVX512-BF16), else fp32")
    student_precision: Literal["auto", "fp32", "bf16"] = field("auto", help="student forward/backward in float32 or under bfloat16 autocast (float32 master weights); auto: as teacher_precision")
    logit_chunk: int = field(256, help="positions whose full-vocabulary logits exist at once in the loss (0: the whole batch)")
    shared_prefix: bool = field(True, help="run the leading layers the student shares unchanged with the teacher once, frozen")
    logit_cache: Optional[str] = field(None, help="folder of a teacher top-k logit cache for the text blocks (filled on first use, reused after); null: off")
    logit_cache_k: int = field(256, help="teacher log-probabilities kept per position in the logit cache (the tail mass is spread evenly)")
    eval_every: int = field(0, help="measure held-out perplexity every N steps (0: off); the curve is saved in the metrics")
    eval_text: str = field("corpus:heldout", help="held-out text for eval_every")
    eval_windows: int = field(4, help="1024-token windows of eval_text scored at each evaluation")
    checkpoint_minutes: float = field(2.0, help="save a resumable checkpoint this often")
    local_fraction: float = field(0.0, help="share of the budget (minutes, else max_steps) spent first on block-local healing: each changed layer trained alone to reproduce the teacher's hidden state at its depth (local.py); 0: off")
    answer_no_repeat_ngram_size: int = field(0, help="written to the student's generation_config.json: its answers never repeat one of their own n-grams of tokens (the prompt does not count; generate.repeated_ngram_bans), which stops the loops a short distillation leaves; 0: leave the setting as the input model had it")
    local_inputs: Literal["student", "teacher"] = field("student", help="block-local healing feeds each layer the student's own (detached) stream or the teacher's hidden state")

    def validate(self, path: str) -> None:
        LOGIT_LOSSES.get(self.loss)
        HIDDEN_LOSSES.get(self.hidden_loss)
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature: must be > 0, got {self.temperature}")
        weights = ("kd_weight", "ce_weight", "hidden_weight", "attention_weight")
        if any(getattr(self, w) < 0 for w in weights) or sum(getattr(self, w) for w in weights) == 0:
            raise ConfigError(f"{path}: {', '.join(weights)} must be ≥ 0 and not all 0")
        for name in ("block_size", "batch_size", "max_steps", "grad_accum", "relation_heads", "chat_examples", "chat_max_new_tokens", "chat_batch_size", "on_policy_max_new_tokens", "unlikelihood_ngram", "eval_windows", "logit_cache_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.chat_fraction <= 1:
            raise ConfigError(f"{path}.chat_fraction: must be between 0 and 1, got {self.chat_fraction}")
        if self.chat_temperature < 0 or self.on_policy_temperature < 0:
            raise ConfigError(f"{path}: chat_temperature and on_policy_temperature must be ≥ 0 (0: greedy), got {self.chat_temperature} and {self.on_policy_temperature}")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ConfigError(f"{path}.on_policy_fraction: must be between 0 and 1, got {self.on_policy_fraction}")
        if self.unlikelihood_weight < 0 or (self.unlikelihood_weight > 0 and self.on_policy_fraction == 0):
            raise ConfigError(f"{path}.unlikelihood_weight: must be ≥ 0, and it acts on the student's own answers: set on_policy_fraction > 0 (got {self.unlikelihood_weight}, on_policy_fraction {self.on_policy_fraction})")
        if not 0 <= self.on_policy_start < 1:
            raise ConfigError(f"{path}.on_policy_start: must be in [0, 1) (a share of the run), got {self.on_policy_start}")
        if self.on_policy_fraction > 0 and (self.chat_fraction == 0 or self.kd_weight == 0):
            raise ConfigError(f"{path}.on_policy_fraction: on-policy steps answer the chat prompts and learn the teacher's distribution; set chat_fraction > 0 and kd_weight > 0")
        if self.logit_chunk < 0 or self.eval_every < 0 or self.answer_no_repeat_ngram_size < 0:
            raise ConfigError(f"{path}: logit_chunk, eval_every and answer_no_repeat_ngram_size must be ≥ 0")
        if self.logit_cache and (self.hidden_weight > 0 or self.attention_weight > 0):
            raise ConfigError(f"{path}.logit_cache: hidden-state and attention losses need the teacher online; set logit_cache: null or their weights to 0")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be > 0, got {self.lr}")
        if not 0 <= self.local_fraction < 1:
            raise ConfigError(f"{path}.local_fraction: must be in [0, 1) (global KD needs some of the budget), got {self.local_fraction}")
        if self.local_fraction > 0 and self.logit_cache:
            raise ConfigError(f"{path}.local_fraction: block-local healing needs the teacher online; set logit_cache: null or local_fraction: 0")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"{path}.minutes: must be > 0 or null, got {self.minutes}")

    def fingerprint(self) -> str:
        """Identifies the training run for resuming; the time budget and evaluation may change between attempts."""
        ignored = ("minutes", "checkpoint_minutes", "max_steps", "eval_every", "eval_text", "eval_windows", "cache_dir", "answer_no_repeat_ngram_size")
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


MIN_BUDGET_SHARE = 0.25  # the least of its time budget a distill stage trains for when a run is behind its plan


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))


def _held_out_ids(tokenizer, config: DistillConfig, seed: int) -> torch.Tensor:
    return sample_blocks(tokenizer, config.eval_text, 1024, config.eval_windows, seed, what="evaluation text").reshape(-1)


def _check_pair(model, teacher, tokenizer, config: DistillConfig) -> None:
    t_vocab, s_vocab = teacher.config.vocab_size, model.config.vocab_size
    if t_vocab != s_vocab and config.kd_weight > 0:
        raise ConfigError(f"teacher and student vocabularies differ ({t_vocab} vs {s_vocab}); logit distillation needs the same tokenizer: set kd_weight: 0 and hidden_weight > 0 to train on hidden states only, or pick a teacher with the student's tokenizer")
    if len(tokenizer) > min(t_vocab, s_vocab):
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the teacher/student embed only {t_vocab}/{s_vocab}; use the models' own tokenizer")


def distill(model, config: DistillConfig = DistillConfig(), ctx: Context | None = None):
    """Train ``model`` (the student) against ``ctx.teacher`` in place; returns the model."""
    ctx = ctx or Context()
    config.validate("distill")
    asked = config  # recorded in the lineage as given; the run's time scale applies to the working copy below
    if config.minutes and ctx.time_scale != 1:
        # `run --minutes` scales the time budget and the step cap with it: the cap was planned with the recipe's
        # minutes, and a longer run must not stop at it with time left (the default at --minutes 60 stopped at
        # step 1000 with 10 of its 48.8 minutes unused).
        config = dataclasses.replace(config, minutes=config.minutes * ctx.time_scale, max_steps=max(1, math.ceil(config.max_steps * ctx.time_scale)))
    if config.minutes and ctx.minutes_cap is not None and ctx.minutes_cap < config.minutes:
        # The stages before ran slower than planned (a CPU without native bf16 takes twice as long to prune and
        # evaluate): training gets what keeps the run to its plan, but never under MIN_BUDGET_SHARE of its
        # budget: a student trained for a few seconds is worth less than a run that ends late.
        fitted = max(ctx.minutes_cap, MIN_BUDGET_SHARE * config.minutes)
        log(f"[yellow]distill: {fitted:.1f} of its {config.minutes:g} minutes fit in the run's plan (the stages before it took longer than planned); "
            f"`minigiant run --minutes M` plans a longer run")
        config = dataclasses.replace(config, minutes=fitted)
    tokenizer = ctx.require_tokenizer("distill")
    teacher = ctx.teacher
    if teacher is None:
        raise ConfigError("distill needs a teacher: pass Context(teacher=...) or --teacher MODEL")
    _check_pair(model, teacher, tokenizer, config)
    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    teacher.eval()
    # bf16 only where it is native (hardware.py): ~5× faster with AMX, ~50× slower where it is emulated.
    precision = {"teacher": resolve_precision(config.teacher_precision), "student": resolve_precision(config.student_precision)}
    # The teacher only runs forward: a bf16 copy of it.
    run_teacher = copy.deepcopy(teacher).to(torch.bfloat16) if precision["teacher"] == "bf16" else teacher
    parallel = DataParallel()  # one process, or one of torchrun's (parallel.py)
    if parallel.world > 1 and config.local_fraction > 0:
        raise ConfigError("distill.local_fraction: block-local healing runs in a single process; set it to 0 for a multi-process run")
    with parallel.main_first():  # process 0 generates and caches the chat answers, the others read them
        data = TrainingData(tokenizer, run_teacher, config, ctx.seed, parallel.world)
    held_out = _held_out_ids(tokenizer, config, ctx.seed) if config.eval_every else None

    cache = None
    if config.logit_cache and data.blocks is not None:
        from .chat import teacher_fingerprint
        from .logit_cache import LogitCache

        fingerprint = {"teacher": teacher_fingerprint(run_teacher), "text": config.text, "seed": ctx.seed}
        cache = LogitCache(config.logit_cache, fingerprint, data.blocks.shape[0], config.block_size, config.logit_cache_k, teacher.config.vocab_size)
    # With the logit cache the teacher does not run on cached blocks, so there is no prefix to share.
    prefix = shared_prefix_layers(model, teacher) if config.shared_prefix and cache is None else 0
    if prefix and not (split_forward_matches(run_teacher, prefix, model.config.vocab_size) and split_forward_matches(model, prefix, model.config.vocab_size)):
        log(f"[yellow]distill: {type(model).__name__} does not split cleanly after layer {prefix}; running the shared layers in both models")
        prefix = 0
    frozen = []
    from ..models.architecture import decoder_layers

    modules = [decoder_layers(model)[i] for i in range(prefix)]
    if not config.train_embeddings or prefix:
        modules += [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    if config.train_only_mlp:
        layers = decoder_layers(model)
        if not all(isinstance(getattr(layer, "mlp", None), torch.nn.Module) for layer in layers):
            raise ConfigError(f"distill.train_only_mlp: {type(model).__name__}'s decoder layers have no `mlp` module; set it to false")
        modules += [child for layer in layers[prefix:] for name, child in layer.named_children() if name != "mlp"]
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    features = None
    if config.hidden_weight > 0 or config.attention_weight > 0:
        features = FeatureMatcher(model, run_teacher, config.hidden_weight, config.hidden_loss, config.attention_weight, config.relation_heads, config.hidden_layer_map, prefix)
    params = [p for p in model.parameters() if p.requires_grad] + (list(features.parameters()) if features is not None else [])
    masks = SparsityMasks(model) if (config.keep_sparsity if config.keep_sparsity is not None else pruned_unstructured(model)) else None
    if masks is not None:
        masks.attach()  # before block-local healing too; detached in the finally below
        log(f"distill: keeping the zeros of {len(masks.masks)} sparse matrices ({masks.zero_fraction_start:.1%} of their weights)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    checkpoint = Checkpoint(ctx.work_dir, config.fingerprint())  # every process resumes from it, process 0 writes it
    # Preparing data (tokenizing, the teacher answering chat prompts) counts against the time budget.
    preparation = time.perf_counter() - started
    budget_s = config.minutes * 60 if config.minutes else None
    state = checkpoint.load(model, optimizer, features)
    if config.on_policy_fraction > 0:
        from .on_policy import OnPolicySampler

        data.on_policy = OnPolicySampler(model, tokenizer, config, ctx.seed, precision["student"] == "bf16", (state or {}).get("on_policy"))
    if state:
        log(f"distill: resuming from step {state['step']} ({checkpoint.dir})")
    else:
        global_steps, local = config.max_steps, None
        if config.local_fraction > 0:
            from .local import heal_blocks

            # A checkpoint is only written by the global phase, so an interrupted local phase reruns whole.
            local_steps = config.max_steps if budget_s else max(1, round(config.local_fraction * config.max_steps))
            global_steps = max(1, config.max_steps - (0 if budget_s else local_steps))
            local_budget = config.local_fraction * max(0.0, budget_s - preparation) if budget_s else None
            local = heal_blocks(model, run_teacher, data, config, [p for p in model.parameters() if p.requires_grad], local_steps,
                                local_budget, prefix, precision["student"] == "bf16", first_index=config.max_steps * config.grad_accum * parallel.world)
            preparation = time.perf_counter() - started
        state = {"step": 0, "total": global_steps, "losses": [], "seconds": preparation, "tokens": 0, "curve": [], "local": local}
    local = state.get("local")
    runner = StepRunner(model, run_teacher, config, features, prefix, cache)

    step, total, tokens = state["step"], state["total"], state["tokens"]
    # The first on-policy step. A timed run starts it once on_policy_start of the training time has passed: on-policy
    # steps are slower, and a start at a share of the planned steps (which follow the pace measured so far) comes
    # late and leaves the phase a fraction of its share. -1: not yet.
    on_policy_step = state.get("on_policy_step", math.ceil(config.on_policy_start * total) if budget_s is None or config.on_policy_start == 0 else -1)
    on_policy_at = preparation + config.on_policy_start * max(0.0, budget_s - preparation) if budget_s is not None else None
    losses: list = state["losses"]
    curve: list = state["curve"]
    elapsed_before = state["seconds"]
    saved_step = first_step = step  # the step of the checkpoint on disk (0: none yet)
    start = time.perf_counter()
    last_checkpoint = start
    stopped_by = "max_steps"

    def evaluate(seconds: float) -> None:
        from ..evaluate.perplexity import perplexity

        curve.append([round(seconds / 60, 3), step, round(perplexity(model, held_out, window=1024, max_windows=None)["ppl"], 3)])
        model.train()

    model.train()
    try:
        with progress() as bar, StopOnInterrupt() as interrupt:
            task = bar.add_task("distill", total=total, completed=step, info="")
            if held_out is not None and not curve:
                evaluate(0.0)
            while step < total:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total, config.warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                parts: dict = {}
                step_tokens = 0
                data.on_policy_from = parallel.micro_index(on_policy_step if on_policy_step >= 0 else step + 1, config.grad_accum, 0) - parallel.rank
                for micro in range(config.grad_accum):
                    batch = data.batch(parallel.micro_index(step, config.grad_accum, micro))
                    for k, v in runner(batch, 1.0 / config.grad_accum).items():
                        parts[k] = parts.get(k, 0.0) + v / config.grad_accum
                    step_tokens += batch.tokens
                parallel.average_gradients(params)
                parts = parallel.mean(parts)
                tokens += parallel.total(step_tokens)
                if not math.isfinite(parts["loss"]):
                    kept = f"the last good checkpoint (step {saved_step}) is in {checkpoint.dir}" if checkpoint.dir and saved_step else "no checkpoint was written yet"
                    raise TrainingError(f"distill: loss became {parts['loss']} at step {step}; stopped, {kept}; lower lr (now {config.lr}) and rerun")
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                losses.append([step, round(parts["loss"], 5), {k: round(v, 5) for k, v in parts.items() if k != "loss"}])

                now = time.perf_counter()
                seconds = elapsed_before + now - start
                if budget_s is not None and step - first_step >= 3:
                    # Fit the schedule to the time budget: as many steps as the measured pace allows.
                    pace = (now - start) / (step - first_step)
                    total = max(step, min(config.max_steps, step + int((budget_s - seconds) / pace)))
                if on_policy_step < 0 and seconds >= on_policy_at:
                    on_policy_step = step
                total, out_of_time, interrupted, on_policy_step = parallel.from_main(total, budget_s is not None and seconds >= budget_s, interrupt.requested, on_policy_step)
                if held_out is not None and (step % config.eval_every == 0 or step == total):
                    evaluate(seconds)
                bar.update(task, completed=step, total=total, info=f"loss {parts['loss']:.3f}  {tokens / max(seconds, 1e-9):,.0f} tok/s" + (f"  ppl {curve[-1][2]:.1f}" if curve else ""))
                state = {"step": step, "total": total, "losses": losses, "seconds": seconds, "tokens": tokens, "curve": curve, "local": local,
                         "on_policy": data.on_policy.stats if data.on_policy else None, "on_policy_step": on_policy_step}
                if (now - last_checkpoint > config.checkpoint_minutes * 60 and step < total) or interrupted:
                    if parallel.is_main:
                        checkpoint.save(model, optimizer, state, features)
                    last_checkpoint, saved_step = now, step
                if interrupted:
                    where = f"; checkpoint of step {step} saved in {checkpoint.dir}, rerun to resume" if checkpoint.dir else ""
                    log(f"[yellow]distill: interrupted after step {step}{where}")
                    raise KeyboardInterrupt
                if out_of_time and step < total:
                    stopped_by = "time"
                    break
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        if masks is not None:
            masks.detach()
        if features is not None:
            features.remove_hooks()

    seconds = elapsed_before + time.perf_counter() - start
    if stopped_by == "max_steps" and budget_s is not None and step < config.max_steps:
        stopped_by = "time"  # the schedule was fitted to the budget and ran to its end
    on_policy = data.on_policy.metrics() if data.on_policy else None
    if on_policy is not None:
        on_policy["first_step"] = on_policy_step if on_policy_step >= 0 else None
    if on_policy:
        from .on_policy import log_summary

        log_summary(on_policy)
    tail = [l for _, l, _ in losses[-10:]]
    if config.answer_no_repeat_ngram_size:
        from ..generate import ANSWER_NGRAM_KEY

        setattr(model.generation_config, ANSWER_NGRAM_KEY, config.answer_no_repeat_ngram_size)
        model.generation_config._from_model_config = False  # else transformers drops keys it does not know on load
    artifact.record_stage(
        model,
        "distill",
        settings=dataclasses.asdict(asked),
        metrics={
            "steps": step,
            "tokens": tokens,
            "seconds": round(seconds, 1),
            "preparation_seconds": round(preparation, 1),
            "tokens_per_s": round(tokens / max(seconds - preparation, 1e-9), 1),
            "stopped_by": stopped_by,
            "budget_minutes": round(config.minutes, 3) if config.minutes else None,  # after the run's scale and cap
            "shared_prefix_layers": prefix,
            "precision": precision,
            "chat_examples": len(data.chat) if data.chat is not None else 0,
            "first_loss": losses[0][1] if losses else None,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "loss_curve": [[s, l] for s, l, _ in losses[:: max(1, len(losses) // 50)]],
            "eval_curve": curve,  # [minutes, step, held-out ppl]
            **({"local": local} if local is not None else {}),
            **({"on_policy": on_policy} if on_policy else {}),
            **({"sparsity": masks.metrics()} if masks is not None else {}),
        },
    )
    return model
