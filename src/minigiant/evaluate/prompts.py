"""A few fixed prompts every model answers, so a person can read what compression did to its replies.

Greedy decoding makes the answers reproducible: the same model gives the same text on every run.
"""

from __future__ import annotations

from ..generate import generate

PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Rewrite this sentence in simpler words: The committee postponed its decision owing to insufficient information.",
)


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """The model's greedy reply to ``prompt`` as one user turn of the chat template (the raw prompt when the
    tokenizer has no template); only the new tokens, special tokens removed."""
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens).strip()


def answer_all(model, tokenizer, max_new_tokens: int = 48, prompts=PROMPTS) -> list[dict]:
    return [{"prompt": prompt, "answer": answer(model, tokenizer, prompt, max_new_tokens)} for prompt in prompts]
