"""Does decoding-time repetition control fix a distilled student's loops without making its answers worse?

Each model answers chat instructions greedily (64 new tokens, as ``minigiant evaluate`` does) under one setting
of its ``generation_config.json``: transformers' ``repetition_penalty`` (1.0 is off), or minigiant's
``answer_no_repeat_ngram_size`` (n: the answer never repeats one of its own n-grams of tokens; 0 is off); one
knob at a time, the other off. The teacher judges the answers: repeated
word 4-grams, and the teacher's NLL per answer token, over all tokens and over fresh tokens only (those that do
not complete a token 4-gram already in the answer; loops flatter the plain NLL). Two prompt sets, so that a
penalty chosen on one is checked on the other: ``builtin`` (the 64 instructions shipped with minigiant, written
for it) and ``dolly`` (the first N held-out Dolly instructions the default-run reports use). Rows go to
benchmarks/results/evaluate.json (benchmark ``repetition_control``; a row replaces the earlier one of the same model,
setting and prompt set).

    PYTHONPATH=src .venv/bin/python benchmarks/repetition_control.py runs/dr-amx2/02-distill --teacher runs/dr-amx2/00-teacher
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "evaluate.json"
LABEL = "repetition_control"
KEYS = ("chat_judge_nll", "chat_judge_nll_stderr", "chat_judge_nll_fresh", "chat_repeat4_rate", "chat_empty_rate", "chat_truncated_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="student model directories")
    parser.add_argument("--teacher", required=True, help="the teacher: judges every answer, and answers itself")
    parser.add_argument("--penalties", default="1.0,1.1,1.2,1.3", help="comma-separated repetition penalties for the students ('': none)")
    parser.add_argument("--ngram-sizes", default="3,4,5,6,8", help="comma-separated answer_no_repeat_ngram_size values for the students ('': none)")
    parser.add_argument("--teacher-penalties", default="1.0,1.2", help="the same for the teacher's own answers")
    parser.add_argument("--teacher-ngram-sizes", default="6")
    parser.add_argument("--instructions", type=int, default=64, help="instructions of each prompt set")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import minigiant
    from minigiant.evaluate.chat import chat_quality, load_instructions
    from minigiant.generate import ANSWER_NGRAM_KEY
    from minigiant.hardware import describe_cpu

    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    sets = {"builtin": load_instructions("builtin", args.instructions),
            "dolly": load_instructions(str(DATA / "instruct" / "dolly_subset151.jsonl"), args.instructions)}
    def settings(penalties: str, sizes: str) -> list[tuple[float, int]]:
        return [(float(p), 0) for p in penalties.split(",") if p] + [(1.0, int(n)) for n in sizes.split(",") if n]

    plan = [(args.teacher, settings(args.teacher_penalties, args.teacher_ngram_sizes))]
    plan += [(path, settings(args.penalties, args.ngram_sizes)) for path in args.models]
    rows = []
    for path, grid in plan:
        model = teacher if path == args.teacher else minigiant.load(path)[0].eval()
        for penalty, n in grid:
            model.generation_config.repetition_penalty = penalty
            setattr(model.generation_config, ANSWER_NGRAM_KEY, n)
            for name, prompts in sets.items():
                start = time.perf_counter()
                chat = chat_quality(model, tokenizer, teacher, prompts, max_new_tokens=64)
                row = {"model": path, "repetition_penalty": penalty, ANSWER_NGRAM_KEY: n, "prompts": name, "instructions": len(prompts),
                       **{k: round(chat[k], 4) for k in KEYS}, "seconds": round(time.perf_counter() - start, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        model.generation_config.repetition_penalty = 1.0
        setattr(model.generation_config, ANSWER_NGRAM_KEY, 0)

    command = "PYTHONPATH=src .venv/bin/python benchmarks/repetition_control.py " + shlex.join(sys.argv[1:])
    common = {"benchmark": LABEL, "time": datetime.date.today().isoformat(), "command": command, "cpu": describe_cpu()}

    def key(r: dict) -> tuple:
        return r.get("benchmark"), r.get("model"), r.get("repetition_penalty"), r.get(ANSWER_NGRAM_KEY), r.get("prompts")

    new = {key({**common, **r}) for r in rows}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([r for r in old if key(r) not in new] + [{**common, **r} for r in rows], indent=1) + "\n")
    print(f"{len(rows)} rows → {RESULTS.relative_to(ROOT)} (benchmark {LABEL!r})")


if __name__ == "__main__":
    main()
