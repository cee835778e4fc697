"""``python -m minigiant.evaluate.worker MODEL_DIR CONFIG_JSON``: evaluate one saved model in a fresh process
and print its result as one JSON line on stdout (the last line). ``evaluate_dirs`` starts one per model so
that each peak-memory number is that model's own.

On a user error the last stderr line is the one-sentence reason and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    os.environ["MINIGIANT_QUIET"] = "1"  # the parent shows the progress
    from ..config import from_dict
    from ..errors import MinigiantError
    from ..models.loading import load
    from . import EvaluateConfig, evaluate

    if len(argv) != 2:
        print("usage: python -m minigiant.evaluate.worker MODEL_DIR CONFIG_JSON", file=sys.stderr)
        return 2
    model_dir, config_json = argv
    try:
        config = from_dict(EvaluateConfig, json.loads(config_json), "evaluate")
        model, tokenizer = load(model_dir)
        result = evaluate(model, tokenizer, config, model_dir=model_dir)
    except MinigiantError as exc:
        if os.environ.get("MINIGIANT_DEBUG") == "1":
            raise
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
