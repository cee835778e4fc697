"""Text generation with the chat template, optionally streamed to the terminal."""

from __future__ import annotations

import math
import sys

import torch

from .errors import ConfigError


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_generation_settings(max_new_tokens: int, temperature: float) -> None:
    """Refuse settings that cannot mean anything, before a model is loaded."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be a whole number of at least 1, got {max_new_tokens}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """``[1, n]`` input ids: the prompt as one user turn of the chat template (when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, chat: bool = True, stream=None) -> str:
    """The model's answer to ``prompt`` (greedy when ``temperature`` is 0); ``stream`` is a text file to print
    tokens to as they come (e.g. ``sys.stdout``)."""
    from transformers import TextStreamer

    check_generation_settings(max_new_tokens, temperature)
    ids = prompt_ids(tokenizer, prompt, chat)
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        if stream is not sys.stdout:
            streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n", file=stream, flush=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id(tokenizer),
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
