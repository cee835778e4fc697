"""A Hugging Face byte-level BPE tokenizer as GGUF ``tokenizer.ggml.*`` metadata (what llama.cpp, Ollama and
transformers' GGUF loader read): tokens, token types, merges, the pre-tokenizer name, special token ids and
the chat template. As ``convert_hf_to_gguf.py`` does it: added special tokens are CONTROL, other added tokens
USER_DEFINED, and ids the tokenizer lacks (an embedding padded past the vocabulary) are ``[PAD<i>]`` UNUSED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gguf import TokenType

from ..errors import ConfigError

# The GPT-2 split regex both Hugging Face's ByteLevel(use_regex=True) and llama.cpp's "gpt-2" use.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad → id
    add_bos: bool = False
    chat_template: str | None = None


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (``tokenizer.ggml.pre``); ConfigError if unknown."""
    if pre is None:
        raise ConfigError("export: the tokenizer has no pre-tokenizer; only byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3 style) export to GGUF")
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        if parts[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX:
            return "llama-bpe"
    raise ConfigError(f"export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp equivalent minigiant knows; only GPT-2, SmolLM and Llama-3 style byte-level BPE tokenizers export to GGUF")


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF view of ``tokenizer`` for a model whose embedding has ``vocab_size`` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("export: GGUF export needs a fast (tokenizers-backed) tokenizer; save the model with its tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"export: the tokenizer is {model.get('type')}, not byte-level BPE; only BPE tokenizers (tokenizer.ggml.model gpt2) export to GGUF")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise ConfigError(f"export: the tokenizer has token id {max(by_id)}, past the model's {vocab_size} embedding rows; export the model with the tokenizer it was trained with")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            special_ids[kind] = int(token_id)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default one
        template = template.get("default")
    return GGUFVocab(tokens, [int(t) for t in types], merges, pre, special_ids, add_bos, template)
