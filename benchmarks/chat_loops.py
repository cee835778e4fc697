"""Does the teacher continue a student's loops? Each model answers held-out Dolly instructions greedily (64 new
tokens, as ``minigiant evaluate`` does); every answer token is then classed by whether it completes a token
4-gram that already occurred in the answer: ``fresh`` (no), ``onset`` (yes, the first of a run: where a loop
starts) or ``repeat`` (yes, inside a run). For each class the rows give the teacher's and the model's mean
probability of the token, given the model's own prefix, and how often it is the teacher's argmax.

If the teacher puts high probability on the repeated tokens, KD on the student's own answers (on-policy)
teaches the loops rather than breaking them, and only an explicit penalty (``unlikelihood_weight``) acts
against them. Rows go to benchmarks/results/distill.json (benchmark ``teacher_on_student_loops``).

    PYTHONPATH=src .venv/bin/python benchmarks/chat_loops.py runs/dr-amx/02-distill --teacher runs/dr-amx/00-teacher
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distill.json"
LABEL = "teacher_on_student_loops"


def token_classes(answer: list[int], n: int = 4) -> list[str]:
    """``fresh``, ``onset`` or ``repeat`` for each token of ``answer`` (see the module doc)."""
    from minigiant.evaluate.chat import completes_repeat

    flags = completes_repeat(answer, n)
    return ["fresh" if not flag else ("repeat" if j and flags[j - 1] else "onset") for j, flag in enumerate(flags)]


@torch.inference_mode()
def loop_rows(model, teacher, tokenizer, prompts: list[str]) -> dict:
    from minigiant.evaluate.chat import answer_instructions

    sums: dict[str, list[float]] = {}
    for a in answer_instructions(model, tokenizer, prompts, 64):
        full = torch.tensor([a["ids"] + a["answer_ids"]])
        start = len(a["ids"]) - 1  # the logits at position p predict token p + 1
        answer = torch.tensor(a["answer_ids"])
        where = torch.arange(len(answer))
        p_teacher = torch.softmax(teacher(full).logits[0, start : start + len(answer)].float(), -1)
        p_model = torch.softmax(model(full).logits[0, start : start + len(answer)].float(), -1)
        for j, kind in enumerate(token_classes(a["answer_ids"])):
            row = sums.setdefault(kind, [0, 0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += p_teacher[where[j], answer[j]].item()
            row[2] += p_model[where[j], answer[j]].item()
            row[3] += float(p_teacher[j].argmax() == answer[j])
    return {kind: {"tokens": n, "teacher_p": round(t / n, 4), "model_p": round(m / n, 4), "teacher_argmax_share": round(arg / n, 4)}
            for kind, (n, t, m, arg) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories whose answers are examined")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--instructions", type=int, default=32, help="held-out Dolly instructions")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import minigiant
    from minigiant.evaluate.chat import load_instructions
    from minigiant.hardware import describe_cpu

    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    prompts = load_instructions(str(DATA / "instruct" / "dolly_subset151.jsonl"), args.instructions)
    rows = []
    for path in [args.teacher, *args.models]:
        model = teacher if path == args.teacher else minigiant.load(path)[0].eval()
        row = {"model": path, "classes": loop_rows(model, teacher, tokenizer, prompts)}
        print(json.dumps(row), flush=True)
        rows.append(row)

    command = "PYTHONPATH=src .venv/bin/python benchmarks/chat_loops.py " + " ".join(sys.argv[1:])
    common = {"benchmark": LABEL, "time": datetime.date.today().isoformat(), "command": command, "instructions": args.instructions, "cpu": describe_cpu()}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([r for r in old if r.get("benchmark") != LABEL] + [{**common, **r} for r in rows], indent=1) + "\n")
    print(f"{len(rows)} rows → {RESULTS.relative_to(ROOT)} (benchmark {LABEL!r})")


if __name__ == "__main__":
    main()
