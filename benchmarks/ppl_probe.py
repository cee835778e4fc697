"""Perplexity of model directories on the two texts the healing comparisons use: WikiText-2 test (first
8 × 1024-token windows) and the packaged held-out books (``corpus:heldout``, first 4 × 1024 tokens).

    .venv/bin/python benchmarks/ppl_probe.py runs/a runs/b

One JSON line per model. Short on purpose (~20 s per model on 2 cores) so equal-minutes comparisons can be
read right after each run; the full evaluation is `minigiant evaluate`.
"""

from __future__ import annotations

import json
import sys

import torch

import minigiant
from minigiant.data.text import load_documents, tokenize_documents
from minigiant.evaluate.perplexity import perplexity
from shared_data import wikitext2_test


def main() -> None:
    torch.set_num_threads(2)
    for directory in sys.argv[1:]:
        model, tokenizer = minigiant.load(directory)
        model.eval()
        wiki = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
        books = tokenize_documents(tokenizer, load_documents("corpus:heldout"), max_tokens=4 * 1024 + 1)
        row = {"model": directory, "wikitext2_ppl_8x1024": round(perplexity(model, wiki)["ppl"], 2),
               "corpus_heldout_ppl_4x1024": round(perplexity(model, books, max_windows=4)["ppl"], 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
