"""Where benchmarks find evaluation data: ``$MINIGIANT_DATA`` (default ``../shared/data`` beside the repo)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA = Path(os.environ.get("MINIGIANT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _text(name: str) -> Path:
    path = DATA / "text" / name
    if not path.is_file():
        sys.exit(f"error: {path} not found; set MINIGIANT_DATA to the shared data folder")
    return path


def wikitext2_test() -> Path:
    """WikiText-2 raw test, the perplexity text of every benchmark; exits with one line if it is missing."""
    return _text("wikitext2_raw_test.txt")


def wikitext2_valid() -> Path:
    """WikiText-2's validation split (the tokenized release, with <unk>): in-domain text that is not the test."""
    return _text("wikitext2_tokens_valid.txt")
