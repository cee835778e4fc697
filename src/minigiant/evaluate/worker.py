"""``python -m minigiant.evaluate.worker MODEL_DIR CONFIG_JSON [OPTIONS_JSON]``: evaluate one saved model in a
fresh process and print its result as one JSON line on stdout (the last line). ``evaluate_dirs`` starts one
per model so that each peak-memory number is that model's own.

OPTIONS_JSON: ``teacher`` (the reference model's directory: agreement and chat judge; loaded after the
peak memory is read), ``cache_dir`` and ``fingerprint`` (per-task result cache), ``teacher_logits`` (the folder
where the teacher's agreement logits are shared, ``agreement.Agreement``). Progress goes to stdout
as ``@step <what>`` lines. On a user error the last stderr line is the one-sentence reason and the exit
status is 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    os.environ["MINIGIANT_QUIET"] = "1"  # the parent shows the progress
    from ..config import from_dict
    from ..errors import MinigiantError
    from ..models.loading import load
    from . import EvaluateConfig, evaluate
    from .harness import shipped_tasks

    if len(argv) not in (2, 3):
        print("usage: python -m minigiant.evaluate.worker MODEL_DIR CONFIG_JSON [OPTIONS_JSON]", file=sys.stderr)
        return 2
    model_dir, config_json = argv[:2]
    options = json.loads(argv[2]) if len(argv) == 3 else {}
    try:
        config = from_dict(EvaluateConfig, json.loads(config_json), "evaluate")
        if all(t.endswith((".yaml", ".yml")) or t in shipped_tasks() for t in config.tasks):
            # local files only: no hub lookups (they would only add time, or hang without a network)
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        model, tokenizer = load(model_dir)
        teacher_dir = options.get("teacher")
        teacher = None
        if teacher_dir and Path(teacher_dir).resolve() != Path(model_dir).resolve():
            teacher = lambda: load(teacher_dir)[0]  # noqa: E731 (loaded inside evaluate, after the peak is read)
        result = evaluate(
            model, tokenizer, config, model_dir=model_dir, teacher=teacher, cache_dir=options.get("cache_dir"),
            model_fingerprint=options.get("fingerprint"), on_step=lambda text: print(f"@step {text}", flush=True),
            teacher_logits=options.get("teacher_logits"),
        )
    except MinigiantError as exc:
        if os.environ.get("MINIGIANT_DEBUG") == "1":
            raise
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
