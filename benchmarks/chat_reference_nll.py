"""What does the teacher-judged chat NLL of a *good* answer look like? The teacher scores the human reference
responses of the held-out Dolly instructions (cut to the same 64 tokens the evaluated answers may have, the
end-of-turn token added when the response ends within them), beside its own greedy answers and a student's.

The chat NLL's reference point is the teacher's own greedy answers, which are its mode and so score as low
as any text can; this puts a human-written answer on the same scale, so a student's number can be read
against both. Rows go to benchmarks/results/evaluate.json (benchmark ``chat_reference_nll``).

    PYTHONPATH=src .venv/bin/python benchmarks/chat_reference_nll.py --teacher runs/dr-amx2/00-teacher
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "evaluate.json"
LABEL = "chat_reference_nll"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--instructions", type=int, default=64, help="the first N held-out Dolly instructions (the default-run reports' set)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import minigiant
    from minigiant.distill.chat import stop_ids
    from minigiant.evaluate.chat import completes_repeat, judge_token_nlls, load_instructions, mean_or_none, repeated_ngram_rate, standard_error
    from minigiant.generate import prompt_ids
    from minigiant.hardware import describe_cpu

    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    path = DATA / "instruct" / "dolly_subset151.jsonl"
    prompts = load_instructions(str(path), args.instructions)
    rows_in = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    responses = [r["response"].strip() for r in rows_in if isinstance(r.get("instruction"), str) and r["instruction"].strip()][: len(prompts)]
    end = sorted(stop_ids(teacher, tokenizer))[0]
    pairs, texts = [], []
    for prompt, response in zip(prompts, responses):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        answer = ids[: args.max_new_tokens] + ([end] if len(ids) < args.max_new_tokens else [])
        pairs.append((prompt_ids(tokenizer, prompt)[0].tolist(), answer))
        texts.append(tokenizer.decode(ids[: args.max_new_tokens]))
    nlls = judge_token_nlls(teacher, pairs)
    per_answer = [mean_or_none(n) for n in nlls if n]
    fresh = [mean_or_none([x for x, rep in zip(n, completes_repeat(a)) if not rep]) for n, (_, a) in zip(nlls, pairs) if n]
    row = {"answers": "Dolly human reference responses", "instructions": len(pairs), "chat_judge_nll": round(mean_or_none(per_answer), 4),
           "chat_judge_nll_stderr": round(standard_error(per_answer), 4), "chat_judge_nll_fresh": round(mean_or_none([f for f in fresh if f is not None]), 4),
           "chat_repeat4_rate": round(repeated_ngram_rate(texts, 4), 4)}
    print(json.dumps(row), flush=True)

    command = "PYTHONPATH=src .venv/bin/python benchmarks/chat_reference_nll.py " + shlex.join(sys.argv[1:])
    common = {"benchmark": LABEL, "time": datetime.date.today().isoformat(), "command": command, "teacher": args.teacher, "cpu": describe_cpu()}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([r for r in old if r.get("benchmark") != LABEL] + [{**common, **row}], indent=1) + "\n")
    print(f"1 row → {RESULTS.relative_to(ROOT)} (benchmark {LABEL!r})")


if __name__ == "__main__":
    main()
