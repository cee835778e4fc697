"""Batched generation (``minigiant.generate.sample_continuations``) against the transformers ``generate`` calls
it replaced, in one run on this machine, and the chat evaluation it makes affordable.

    PYTHONPATH=src python benchmarks/generation_speed.py --teacher runs/teacher --student runs/default/02-distill

1. The teacher's chat answers of distillation (Magpie prompts, then answers; ``distill.chat.teacher_answers``)
   for ``--examples`` prompts, generated once with the old sampler (``model.generate``: top-p by sorting the
   vocabulary, ``torch.multinomial``, finished rows kept in the batch) and once with the new one, each into an
   empty cache.
2. The chat evaluation of each model (``evaluate.chat.chat_quality``) on the first 10 built-in instructions,
   the old way (one prompt at a time through ``model.generate``, one judge forward per answer) and batched;
   then batched on all 64 built-in instructions, with the standard error of the chat NLL.

Rows go to benchmarks/results/generation.json (replacing rows of the same benchmark, name and CPU ISA).
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"


def old_sample_continuations(model, prompts_ids, pad, stops, max_new_tokens, temperature, seed, top_p=0.95):
    """The sampler before 2026-12-04, verbatim but for its name: one ``model.generate`` call."""
    width = max(len(p) for p in prompts_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=attention, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row if end is None else row[:end], end is not None))
    return results


@torch.inference_mode()
def old_chat_quality(model, tokenizer, judge, prompts, max_new_tokens=64):
    """The chat evaluation before 2026-12-04: one prompt at a time, one judge forward per answer."""
    from minigiant.evaluate.chat import repeated_ngram_rate
    from minigiant.generate import pad_id, prompt_ids

    eos, nlls, texts = tokenizer.eos_token_id, [], []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                   temperature=None, top_p=None, top_k=None, pad_token_id=pad_id(tokenizer))[0, ids.shape[1]:].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        texts.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
        if generated:
            full = torch.tensor([ids[0].tolist() + generated])
            logits = judge(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1].float()
            nlls.append(F.cross_entropy(logits, full[0, ids.shape[1]:]).item())
    return {"chat_judge_nll": sum(nlls) / len(nlls), "chat_repeat4_rate": repeated_ngram_rate(texts), "answers": texts}


def write_rows(rows: list[dict]) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    key = lambda r: (r["benchmark"], r["name"], r.get("isa"))  # noqa: E731
    keys = {key(r) for r in rows}
    RESULTS.write_text(json.dumps([r for r in old if key(r) not in keys] + rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/teacher")
    parser.add_argument("--student", action="append", default=[], help="a model directory to evaluate (repeatable)")
    parser.add_argument("--examples", type=int, default=32, help="teacher answers per sampler")
    parser.add_argument("--skip-answers", action="store_true")
    parser.add_argument("--batch-sizes", default="", help="comma-separated chat_batch_size values: time only the new sampler's teacher answers at each (no chat evaluation)")
    args = parser.parse_args()

    generate = importlib.import_module("minigiant.generate")  # the package exports a function of that name
    from minigiant.distill.chat import teacher_answers
    from minigiant.distill.trainer import DistillConfig
    from minigiant.evaluate.chat import chat_quality, load_instructions
    from minigiant.hardware import describe_cpu
    from minigiant.models.loading import load as load_model

    isa = describe_cpu()["isa"]
    teacher, tokenizer = load_model(args.teacher)
    teacher.eval()
    rows = []

    def time_answers(config) -> dict:
        """``usable``, ``answer_tokens`` and ``seconds`` of the teacher's answers, written into an empty cache."""
        with tempfile.TemporaryDirectory() as cache:
            config.cache_dir = cache
            start = time.perf_counter()
            answers = teacher_answers(teacher, tokenizer, config, seed=0)
            seconds = time.perf_counter() - start
        usable = [a for a in answers if a["prompt"]]
        return {"usable": len(usable), "answer_tokens": sum(len(tokenizer(a["answer"])["input_ids"]) for a in usable), "seconds": round(seconds, 1)}

    command = "PYTHONPATH=src python benchmarks/generation_speed.py " + " ".join(f"--student {s}" for s in args.student) + f" --examples {args.examples}"
    if args.batch_sizes:
        for batch in map(int, args.batch_sizes.split(",")):
            timed = time_answers(DistillConfig(chat_examples=args.examples, chat_max_new_tokens=128, chat_batch_size=batch))
            rows.append({"benchmark": "teacher_answers_batch", "name": f"chat_batch_size {batch}", "isa": isa, "examples": args.examples, **timed,
                         "ms_per_answer_token": round(1000 * timed["seconds"] / timed["answer_tokens"], 1),
                         "command": f"PYTHONPATH=src python benchmarks/generation_speed.py --examples {args.examples} --batch-sizes {args.batch_sizes}"})
            print(rows[-1], flush=True)
        write_rows(rows)
        return
    if not args.skip_answers:
        new_sampler = generate.sample_continuations
        timings = {}
        for name, sampler in (("model.generate (before)", old_sample_continuations), ("sample_continuations", new_sampler)):
            generate.sample_continuations = sampler
            timed = time_answers(DistillConfig(chat_examples=args.examples, chat_max_new_tokens=128))
            timings[name] = timed["seconds"]
            rows.append({"benchmark": "teacher_answers", "name": name, "isa": isa, "examples": args.examples, **timed, "command": command})
            print(rows[-1], flush=True)
        generate.sample_continuations = new_sampler
        rows[-1]["speedup"] = round(timings["model.generate (before)"] / timings["sample_continuations"], 2)

    prompts = load_instructions("builtin")
    for path in [args.teacher, *args.student]:
        model, _ = (teacher, tokenizer) if path == args.teacher else load_model(path)
        model.eval()
        start = time.perf_counter()
        old = old_chat_quality(model, tokenizer, teacher, prompts[:10])
        old_s = time.perf_counter() - start
        start = time.perf_counter()
        new = chat_quality(model, tokenizer, teacher, prompts[:10])
        new_s = time.perf_counter() - start
        same = sum(a == b["answer"] for a, b in zip(old["answers"], new["chat_answers"]))
        start = time.perf_counter()
        full = chat_quality(model, tokenizer, teacher, prompts)
        full_s = time.perf_counter() - start
        row = {"benchmark": "chat_eval", "name": path, "isa": isa,
               "old_10_seconds": round(old_s, 1), "batched_10_seconds": round(new_s, 1), "speedup_10": round(old_s / new_s, 2),
               "identical_answers_10": same, "old_10_nll": round(old["chat_judge_nll"], 3), "batched_10_nll": round(new["chat_judge_nll"], 3),
               "batched_10_nll_stderr": round(new["chat_judge_nll_stderr"], 3),
               "batched_64_seconds": round(full_s, 1), "batched_64_nll": round(full["chat_judge_nll"], 3),
               "batched_64_nll_stderr": round(full["chat_judge_nll_stderr"], 3), "batched_64_repeat4": round(full["chat_repeat4_rate"], 3),
               "command": command}
        rows.append(row)
        print(row, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows)


if __name__ == "__main__":
    main()
