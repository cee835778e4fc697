"""One model behind the server and the chat CLI: a chat or text prompt in, text pieces out as they are decoded.

Decoding is ``generate.decode_steps`` (KV cache, exact top-p, the model's own generation config: repetition
penalty and the answer n-gram ban), so a served model answers exactly as the chat evaluation measured it.
Requests run one at a time (a lock): on a laptop CPU two concurrent decodes only share the same cores.

JSON mode (``Sampling.json``) constrains every step to the tokens that keep the answer a valid prefix of JSON
matching a schema, with lm-format-enforcer's character-level parser; once the value is complete only the end
token is allowed, so the answer always parses (unless ``max_tokens`` cuts it: ``finish_reason`` "length").
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass
class Sampling:
    """How to decode one request. The defaults are llama.cpp server's (temperature 0.8, top-p 0.95)."""

    max_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)  # strings that end the answer (not included in it)
    seed: int | None = None  # None: a fresh seed per request
    json: dict | None = None  # a JSON schema the answer must match ({} or {"type": "object"}: any JSON object)

    def check(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be 0 (greedy) or a positive number, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise ConfigError("stop must be a non-empty string or a list of at most 4 of them")


@dataclass
class Piece:
    """What a decode yields: ``text`` as it comes, and on the last piece the ``finish_reason`` ("stop" or
    "length") and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds_to_first_token: float | None = None
    tokens_per_second: float | None = None


class Engine:
    """A loaded model and tokenizer, answering one request at a time."""

    def __init__(self, model, tokenizer, name: str):
        from ..distill.chat import stop_ids
        from ..generate import model_decoding, pad_id

        self.model, self.tokenizer, self.name = model, tokenizer, name  # decoding runs under inference_mode; the model's mode is left as it is
        self.stops = stop_ids(model, tokenizer)
        self.pad = pad_id(tokenizer)
        self.decoding = model_decoding(model)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._json_tokenizer = None

    @classmethod
    def load(cls, source: str, name: str | None = None) -> "Engine":
        from ..models.loading import load

        model, tokenizer = load(source)
        return cls(model, tokenizer, name or (Path(str(source)).name if str(source) != "default" else "default"))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The conversation through the chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"model {self.name!r} has no chat template; use /v1/completions with a plain prompt")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def _allowed_tokens(self, schema: dict):
        """lm-format-enforcer's allowed-token function for ``schema`` (the tokenizer's table is built once)."""
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

        if self._json_tokenizer is None:
            self._json_tokenizer = TokenEnforcerTokenizerData(
                token_strings(self.tokenizer, self.model.config.vocab_size),
                lambda tokens: self.tokenizer.decode(tokens).rstrip("\ufffd"),
                sorted(self.stops),  # "the value is complete": the tokens the model stops on
                False, self.model.config.vocab_size)
        unknown = unknown_types(schema)
        if unknown:
            raise ConfigError(f"response_format: the JSON schema cannot be used: unknown type {unknown[0]!r}; JSON Schema's types are {', '.join(JSON_TYPES)}")
        try:
            enforcer = TokenEnforcer(self._json_tokenizer, JsonSchemaParser(schema or {"type": "object"}))
        except Exception as error:  # the library raises plain Exceptions and pydantic errors for schemas it cannot use
            raise ConfigError(f"response_format: the JSON schema cannot be used: {str(error).splitlines()[0]}") from None
        # One whitespace character at a time (the library allows 12): a small model otherwise pads the JSON with
        # newlines until the limit, between every key and value and after the closing brace.
        enforcer.root_parser.config.max_consecutive_whitespaces = 1

        return lambda prompt, tokens: enforcer.get_allowed_tokens(list(tokens)).allowed_tokens

    def stream(self, prompt_ids: list[int], sampling: Sampling):
        """Yield ``Piece``s of the answer to ``prompt_ids``; the last one carries the finish reason and counts.
        Closing the generator stops decoding."""
        from ..generate import decode_steps

        sampling.check()
        if self.context and len(prompt_ids) + sampling.max_tokens > self.context:
            raise ConfigError(f"the prompt is {len(prompt_ids)} tokens and max_tokens {sampling.max_tokens}; "
                              f"together they exceed the model's context of {self.context} tokens: shorten the prompt or lower max_tokens")
        seed = sampling.seed if sampling.seed is not None else time.time_ns() % (2**31)
        allowed = self._allowed_tokens(sampling.json) if sampling.json is not None else None
        with self._lock:
            start = time.perf_counter()
            first = None
            tokens: list[int] = []
            text = sent = ""  # the answer so far, and the part of it already yielded
            finish = "length"
            hold = max((len(s) for s in sampling.stop), default=1) - 1  # characters held back: a stop may be forming
            for step in decode_steps(self.model, [prompt_ids], self.pad, self.stops, sampling.max_tokens, sampling.temperature, seed,
                                     sampling.top_p, self.decoding["repetition_penalty"], self.decoding["answer_no_repeat_ngram_size"], allowed):
                (_, token), = step
                first = first if first is not None else time.perf_counter() - start
                if token in self.stops:
                    finish = "stop"
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                visible = text.rstrip("\ufffd")  # a character split across tokens is held until its last byte comes
                cuts = [i for i in (visible.find(s, max(0, len(sent) - hold)) for s in sampling.stop) if i >= 0]
                if cuts:
                    text, finish = text[: min(cuts)], "stop"
                    break
                if len(visible) - hold > len(sent):
                    yield Piece(visible[len(sent) : len(visible) - hold])
                    sent = visible[: len(visible) - hold]
            if allowed is not None and finish == "stop" and not parses(text):
                # lm-format-enforcer gives up on some schemas mid-answer (it logs and allows only the end token)
                raise ConfigError("response_format: the answer could not be kept to this JSON schema; simplify the schema")
            decode_seconds = time.perf_counter() - start - (first or 0.0)
            speed = (len(tokens) - 1) / decode_seconds if len(tokens) > 1 and decode_seconds > 0 else None
            yield Piece(text[len(sent) :], finish, len(prompt_ids), len(tokens), first, speed)


def token_strings(tokenizer, vocab_size: int) -> list[tuple[int, str, bool]]:
    """``(id, text, starts a word)`` for every ordinary token, as lm-format-enforcer's parser needs them (its own
    transformers helper imports a module transformers 5 removed). A token's text is read after a "0", so a
    leading space that decoding a lone token would drop is kept."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    rows = []
    for token in range(min(vocab_size, len(tokenizer))):
        if token in special:
            continue
        after_zero = tokenizer.decode([zero, token])[1:]
        rows.append((token, after_zero, len(after_zero) > len(tokenizer.decode([token]))))
    return rows


JSON_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def unknown_types(schema) -> list:
    """The values of ``type`` anywhere in ``schema`` that JSON Schema does not define (the parser would only
    fail on them once the answer reached that part of the schema)."""
    found = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "type":
                found += [t for t in (value if isinstance(value, list) else [value]) if t not in JSON_TYPES]
            elif key not in ("enum", "const", "default", "examples"):
                found += unknown_types(value)
    elif isinstance(schema, list):
        for item in schema:
            found += unknown_types(item)
    return found


def parses(text: str) -> bool:
    import json

    try:
        json.loads(text)
        return True
    except ValueError:
        return False
