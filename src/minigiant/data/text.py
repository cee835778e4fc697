"""Plain-text corpora → token blocks.

A text *spec* names where text comes from:
- ``corpus`` / ``corpus:train`` / ``corpus:heldout``: the public-domain books shipped in the package
  (``data/corpus``, credits in its README). ``train`` is the first 95% of each book, ``heldout`` the last 5%,
  so the default recipe can measure perplexity on text it did not train on.
- a path to a ``.txt`` file, or to a folder of ``.txt`` files (one document each);
- ``samples`` (calibration text of ``prune`` and ``quantize`` only): the model's own free-running samples,
  generated and cached by ``data/samples.py`` before calibration reads them.
Where text is cut into blocks (``sample_blocks``: calibration, training text), specs joined by ``+`` mix:
``corpus:train+samples`` takes half the blocks from each.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import DataError

DEFAULT_CORPUS = Path(__file__).parent / "corpus"
HELDOUT_FRACTION = 0.05


def spec_parts(spec: str) -> list[str]:
    """The texts a spec mixes: ``a+b`` is two, unless a file or folder of that very name exists."""
    return spec.split("+") if "+" in spec and not Path(spec).expanduser().exists() else [spec]


def _split(text: str, part: str) -> str:
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # cut at a line boundary
    return text[:cut] if part == "train" else text[cut:]


def load_documents(spec: str) -> list[str]:
    """The documents named by ``spec`` (see module doc); raises DataError when missing or empty."""
    name, _, part = spec.partition(":")
    if spec == "samples":
        raise DataError("'samples' (a model's own free-running samples) is calibration text for prune and quantize only; pass a .txt file, a folder, or 'corpus' here")
    if len(spec_parts(spec)) > 1:
        raise DataError(f"{spec!r}: a '+' mix of texts works where text is cut into blocks (calibration, training text), not here; pass one text")
    if name == "corpus":
        part = part or "train"
        if part not in ("train", "heldout", "all"):
            raise DataError(f"unknown corpus split {part!r}; use corpus:train, corpus:heldout or corpus:all")
        files = sorted(DEFAULT_CORPUS.glob("*.txt"))
        texts = [f.read_text(encoding="utf-8") for f in files]
        docs = texts if part == "all" else [_split(t, part) for t in texts]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"text file or folder {spec!r} does not exist; pass a .txt file, a folder of .txt files, or 'corpus'")
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        try:
            docs = [f.read_text(encoding="utf-8") for f in files]
        except UnicodeDecodeError as exc:
            raise DataError(f"{spec} is not UTF-8 text ({exc.reason}); pass plain .txt files") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {spec!r}; pass a non-empty .txt file or folder")
    return docs


def tokenize_documents(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of all documents, each followed by EOS, as one 1-D tensor (cut at ``max_tokens``)."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for doc in docs:
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            out.append(eos)
        if max_tokens is not None and len(out) >= max_tokens:
            out = out[:max_tokens]
            break
    return torch.tensor(out, dtype=torch.long)


def pack_blocks(ids: torch.Tensor, block_size: int, min_blocks: int = 1, what: str = "text") -> torch.Tensor:
    """Non-overlapping ``[n, block_size]`` blocks from a 1-D id tensor (the tail that does not fill a block is dropped)."""
    n = ids.numel() // block_size
    if n < min_blocks:
        raise DataError(f"{what} has {ids.numel()} tokens, too short for {min_blocks} block(s) of {block_size} tokens; give more text or a smaller block size")
    return ids[: n * block_size].view(n, block_size)


def sample_blocks(tokenizer, spec: str, block_size: int, num_blocks: int, seed: int = 0, what: str = "text") -> torch.Tensor:
    """``num_blocks`` blocks of ``block_size`` tokens spread over all documents of ``spec`` (shuffled, seeded).

    Only as much text as needed is tokenized: documents are visited in a seeded random order and cut into
    blocks; if the text is shorter than asked, all its blocks are returned (at least one is required).
    """
    parts = spec_parts(spec)
    if len(parts) > 1:  # a mix: an equal share of the blocks from each text, shuffled together
        counts = [num_blocks // len(parts) + (i < num_blocks % len(parts)) for i in range(len(parts))]
        mixed = torch.cat([sample_blocks(tokenizer, part, block_size, n, seed, what) for part, n in zip(parts, counts) if n])
        return mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(seed))]
    docs = load_documents(spec)
    rng = random.Random(seed)
    # Take an equal share from each document so one long book does not dominate the sample.
    share = -(-num_blocks // len(docs)) * block_size * 5  # characters ≈ 4-5 per token; over-read a little
    blocks = []
    for doc in docs:
        start = rng.randrange(0, max(1, len(doc) - share)) if len(doc) > share else 0
        ids = tokenize_documents(tokenizer, [doc[start : start + share]])
        if ids.numel() >= block_size:
            blocks.append(pack_blocks(ids, block_size))
    if not blocks:
        total = sum(len(d) for d in docs)
        raise DataError(f"{what} ({spec}) is too short: {total} characters give no block of {block_size} tokens; give more text or a smaller block size")
    all_blocks = torch.cat(blocks)
    order = torch.randperm(all_blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return all_blocks[order[:num_blocks]]


def text_paths(config) -> list[Path]:
    """The files and folders a config's text specs (fields named ``*text``) read: what a writer must not
    overwrite (``artifact.check_output`` inputs). The shipped corpus is not listed."""
    import dataclasses

    paths = []
    for f in dataclasses.fields(config):
        spec = getattr(config, f.name)
        if not (f.name.endswith("text") and isinstance(spec, str)):
            continue
        for part in spec_parts(spec):
            path = Path(part).expanduser()
            if part.partition(":")[0] != "corpus" and path.exists():
                paths.append(path)
    return paths
