"""How far the MLP refit (``prune`` option ``refit_steps``) goes with more steps and tokens, and whether its
better start survives the same number of logit-KD steps.

    .venv/bin/python benchmarks/mlp_refit_sweep.py --out benchmarks/results/mlp_refit_sweep.json

Prunes the teacher once with the default recipe's width prune (lstsq, mix calibration), then for each variant
refits a copy of it (steps, calibration blocks of 512 tokens, learning rate, tokens per step), scores
WikiText-2 test (8 × 1024 tokens) and the held-out books (4 × 1024), then runs ``--kd-steps`` steps of plain
logit KD (forward KL at T = 1 plus 0.1 CE, AdamW lr 4e-4, 4 × 256 book tokens a step, embedding frozen: the
default recipe's settings, without its chat half) and scores again. Runs on a GPU when there is one (the refit
and KD only; pruning and calibration run on the CPU as the package does); one JSON row per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

import minigiant
from minigiant import artifact
from minigiant.context import Context
from minigiant.distill.losses import LOGIT_LOSSES
from minigiant.data.text import load_documents, sample_blocks, tokenize_documents
from minigiant.evaluate.perplexity import perplexity
from minigiant.prune import PruneConfig, prune
from minigiant.prune.refit import capture_mlp_io, refit_mlps
from shared_data import wikitext2_test

# STEPS:BLOCKS:LR:TOKENS = refit steps, calibration blocks of 512 tokens (the last eighth held out), Adam lr,
# tokens per step; 0 steps = the lstsq prune alone. The 2026-12-04 run's variants:
VARIANTS = "0:32:0:0,200:32:1e-3:1024,200:128:1e-3:1024,600:128:1e-3:1024,200:128:3e-3:1024,200:64:1e-3:1024,2000:512:1e-3:2048"


def kd_steps(student, teacher, batches: torch.Tensor, steps: list[int], score) -> dict:
    """Logit KD as the default recipe runs it (without chat data); scores after each count in ``steps``."""
    params = [p for name, p in student.named_parameters() if "embed_tokens" not in name and "lm_head" not in name]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.0)
    scores, done = {}, 0
    for target in steps:
        for batch in batches[done * 4 : target * 4].split(4):
            batch = batch.to(student.device)
            with torch.no_grad():
                t = teacher(batch).logits.float()
            s = student(batch).logits.float()
            ce = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), batch[:, 1:].reshape(-1))
            loss = LOGIT_LOSSES.get("kl")(s, t, 1.0).mean() + 0.1 * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        done = target
        scores[target] = score(student)
    student.requires_grad_(False)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--calibration", default="corpus:train+samples", help="the default prune's calibration text (a samples file path works too)")
    parser.add_argument("--variants", default=VARIANTS, help="comma-separated STEPS:BLOCKS:LR:TOKENS")
    parser.add_argument("--calibration-blocks", type=int, default=32, help="the prune's calibration blocks of 512 tokens (32: the default recipe)")
    parser.add_argument("--kd-steps", default="100,300")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    start = time.time()
    pruned = copy.deepcopy(teacher)
    config = PruneConfig(structure="width", width_parts="mlp", importance="activation", reconstruct="lstsq", calibration_text=args.calibration,
                         calibration_blocks=args.calibration_blocks, block_size=512, target=0.6)
    prune(pruned, config, Context(tokenizer=tokenizer))
    print(f"pruned in {time.time() - start:.0f}s", flush=True)
    teacher.to(device)
    wiki = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    books = tokenize_documents(tokenizer, load_documents("corpus:heldout"), max_tokens=4 * 1024 + 1)

    def score(model) -> dict:
        model.eval()
        with torch.no_grad():
            return {"wikitext2_ppl_8x1024": round(perplexity(model, wiki)["ppl"], 2), "corpus_heldout_ppl_4x1024": round(perplexity(model, books, max_windows=4)["ppl"], 2)}

    text = artifact.lineage(pruned)["stages"][-1]["metrics"].get("calibration_file", args.calibration)  # the samples file the prune used
    variants = {name: tuple(float(v) if i == 2 else int(v) for i, v in enumerate(name.split(":"))) for name in args.variants.split(",")}
    most, own = max(v[1] for v in variants.values()), args.calibration_blocks
    # The prune's own calibration blocks first (seed 0), then fresh ones (seed 1) for the bigger variants.
    calibration = sample_blocks(tokenizer, text, 512, own, 0)
    if most > own:
        calibration = torch.cat([calibration, sample_blocks(tokenizer, text, 512, most - own, 1)])
    cached = capture_mlp_io(teacher, calibration.to(device), 16)
    kd_batches = sample_blocks(tokenizer, "corpus:train", 256, 4 * max(int(s) for s in args.kd_steps.split(",")), 2)
    rows = []
    for name, (steps, blocks, lr, batch_tokens) in variants.items():
        student = copy.deepcopy(pruned).to(device)
        start = time.time()
        row: dict = {"variant": name, "refit_steps": steps, "calibration_tokens": blocks * 512, "lr": lr, "batch_tokens": batch_tokens}
        if steps:
            # Hold out the last eighth of *these* blocks, as the prune option does with its own.
            report = refit_mlps(student, [(x[:blocks], y[:blocks]) for x, y in cached], steps, lr, batch_tokens, seed=0)
            row |= {"heldout_error_before": round(sum(r["heldout_error_before"] for r in report) / len(report), 5),
                    "heldout_error": round(sum(r["heldout_error"] for r in report) / len(report), 5),
                    "kept_steps": [r["kept_step"] for r in report]}
        row["refit_seconds"] = round(time.time() - start, 1)
        row["one_shot"] = score(student)
        print(json.dumps(row), flush=True)
        if args.kd_steps:
            row["after_kd"] = kd_steps(student, teacher, kd_batches, [int(s) for s in args.kd_steps.split(",")], score)
        row["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(json.dumps(row), flush=True)
        rows.append(row)
        del student
        if args.out:  # after every variant, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"command": "benchmarks/mlp_refit_sweep.py " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
