"""Text generation: one answer with the chat template, optionally streamed to the terminal (``generate``), and
many continuations at once for the teacher's answers, model samples, on-policy steps and the chat evaluation
(``sample_continuations``)."""

from __future__ import annotations

import inspect
import math

import torch

from .errors import ConfigError


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def cache_keyword(model) -> str:
    """transformers renames ``past_key_values`` to ``cache`` (5.24 warns, 5.40 drops the old name): pass whichever
    the installed model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, chat: bool = True, stream=None, seed: int = 0) -> str:
    """The model's answer to ``prompt`` (greedy when ``temperature`` is 0, else top-p 0.95 sampling seeded with
    ``seed``), decoded as its generation config asks (``model_decoding``), by the engine ``minigiant serve``
    and ``chat`` use; ``stream`` is a text file to print the answer to as it comes (e.g. ``sys.stdout``)."""
    from .serve.engine import Engine, Sampling

    check_generation_settings(max_new_tokens, temperature)
    ids = prompt_ids(tokenizer, prompt, chat)[0].tolist()
    answer = ""
    for piece in Engine(model, tokenizer, "model").stream(ids, Sampling(max_tokens=max_new_tokens, temperature=temperature, seed=seed)):
        answer += piece.text
        if stream is not None:
            print(piece.text, end="", file=stream, flush=True)
    if stream is not None:
        print(file=stream)
    return answer


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``logits`` ``[rows, vocab]``, sampled at ``temperature`` from the nucleus: the
    most likely tokens whose probabilities, highest first, reach ``top_p`` (a token is kept when the mass of
    the tokens above it is under ``top_p``, as in transformers' ``TopPLogitsWarper``).

    Exact, but cheaper on a CPU than sorting the vocabulary and drawing from all of it (``torch.multinomial``
    makes one random number per token), which took a third of a decode step of the default teacher: the
    nucleus is looked for among the 256, then 4096 most likely tokens (``topk``), the whole vocabulary is
    sorted only when some row's nucleus is wider still, and the token is drawn with one uniform number per
    row against the cumulative probabilities."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        weights, index = probs, None
    else:
        for k in (256, 4096, probs.shape[-1]):
            if k >= probs.shape[-1]:
                top, index = probs.sort(dim=-1, descending=True)
                break
            top, index = probs.topk(k, dim=-1)
            if bool((top.sum(-1) >= top_p).all()):
                break
        above = top.cumsum(-1) - top  # the mass of the tokens ranked above each one
        weights = torch.where(above < top_p, top, torch.zeros_like(top))
    cumulative = weights.cumsum(-1)
    uniform = 1.0 - torch.rand(len(weights), 1, generator=generator, device=weights.device)  # in (0, 1]: never a zero-weight token
    choice = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).clamp(max=weights.shape[-1] - 1)
    return (choice if index is None else index.gather(1, choice)).squeeze(1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: the logit of each token marked in ``seen``
    (``[rows, vocab]`` bool) is divided by ``penalty`` when positive and multiplied by it when negative, so
    with ``penalty`` > 1 a token already in the text always loses probability."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


ANSWER_NGRAM_KEY = "answer_no_repeat_ngram_size"  # minigiant's key in generation_config.json (transformers ignores it)


def model_decoding(model) -> dict:
    """How the model's ``generation_config.json`` asks to be decoded, as keyword arguments of
    ``sample_continuations``: transformers' ``repetition_penalty`` (1.0 when absent), which ``generate`` applies
    too, and minigiant's ``answer_no_repeat_ngram_size`` (0 when absent). The chat evaluation answers with
    them, so a model is measured the way it is served."""
    config = getattr(model, "generation_config", None)
    penalty = getattr(config, "repetition_penalty", None)
    return {"repetition_penalty": float(penalty) if penalty is not None else 1.0,
            "answer_no_repeat_ngram_size": int(getattr(config, ANSWER_NGRAM_KEY, None) or 0)}


def repeated_ngram_bans(tokens: list[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in ``tokens`` if they came next: ``[1, 2, 3, 1, 2]``
    with n = 3 bans ``[3]`` (``1 2 3`` again). Unlike transformers' ``no_repeat_ngram_size``, the caller passes
    the answer only, not the prompt: banning the prompt's n-grams forbids restating the question or quoting the
    context it gives."""
    if n < 1 or len(tokens) < n - 1:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def ban_repeated_ngrams(logits: torch.Tensor, answers: list[list[int]], n: int) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with ``-inf`` at each row's ``repeated_ngram_bans`` of its answer so far."""
    bans = [(row, token) for row, answer in enumerate(answers) for token in repeated_ngram_bans(answer, n)]
    if not bans:
        return logits
    rows, banned = zip(*bans)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(banned, device=logits.device))
    return logits.index_put(index, torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device))


@torch.inference_mode()
def sample_continuations(model, prompts_ids: list[list[int]], pad: int, stops: set[int], max_new_tokens: int, temperature: float,
                         seed: int, top_p: float = 0.95, repetition_penalty: float = 1.0,
                         answer_no_repeat_ngram_size: int = 0) -> list[tuple[list[int], int | None]]:
    """``(token ids, stop)`` for each prompt: greedy when ``temperature`` is 0, else sampled from the
    ``top_p`` nucleus at ``temperature`` (``nucleus_sample``, from a generator seeded with ``seed``; the global
    RNG is not touched). ``repetition_penalty`` > 1 makes every token already in the row's prompt or
    continuation less likely, as transformers' ``repetition_penalty`` does (``penalize_repeats``);
    ``answer_no_repeat_ngram_size`` n > 0 never lets a continuation repeat one of its own n-grams of tokens
    (``repeated_ngram_bans``). ``stop`` is the token of ``stops`` that ended the continuation, None when it ran to
    ``max_new_tokens``; the ids stop before that token (a model may have several end tokens, and a caller
    that keeps the ending must keep the one the model chose).

    The prompts run as one left-padded batch with a KV cache, and a row that has ended leaves the batch (and
    the cache) at once, so the batch costs what its unfinished rows cost rather than what its longest row
    does: most of the teacher's self-written prompts end after 20-40 of their 64 tokens."""
    outputs: list[list[int]] = [[] for _ in prompts_ids]
    finished: list[int | None] = [None] * len(prompts_ids)
    for step in decode_steps(model, prompts_ids, pad, stops, max_new_tokens, temperature, seed, top_p, repetition_penalty, answer_no_repeat_ngram_size):
        for prompt, token in step:
            if token in stops:
                finished[prompt] = token
            else:
                outputs[prompt].append(token)
    return list(zip(outputs, finished))


@torch.inference_mode()
def decode_steps(model, prompts_ids: list[list[int]], pad: int, stops: set[int], max_new_tokens: int, temperature: float,
                 seed: int, top_p: float = 0.95, repetition_penalty: float = 1.0, answer_no_repeat_ngram_size: int = 0,
                 allowed_tokens=None):
    """The decoding loop of ``sample_continuations``, one step at a time: after each step it yields
    ``[(prompt index, token)]`` for every row that was still generating (a token of ``stops`` ends its row), so a
    server can stream the tokens as they come and stop early by closing the generator.
    ``allowed_tokens(prompt index, continuation so far)`` returns the only token ids that may come next, or
    None for any (constrained decoding: ``serve.engine``'s JSON mode)."""
    from transformers import DynamicCache

    device = model.device
    width = max(len(p) for p in prompts_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache, keyword = DynamicCache(config=model.config), cache_keyword(model)
    outputs: list[list[int]] = [[] for _ in prompts_ids]
    active = list(range(len(prompts_ids)))  # the prompt of each batch row still generating
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache}, logits_to_keep=1).logits[:, -1]
    positions = positions[:, -1:]
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row has had so far, padding left out
        seen = torch.zeros(len(prompts_ids), logits.shape[-1], dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts_ids):
            seen[row, list(prompt)] = True
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        if allowed_tokens is not None:
            logits = keep_only(logits, [allowed_tokens(p, outputs[p]) for p in active])
        if answer_no_repeat_ngram_size:
            banned = ban_repeated_ngrams(logits, [outputs[p] for p in active], answer_no_repeat_ngram_size)
            if allowed_tokens is not None:  # where a constraint leaves only banned tokens, the row keeps them
                banned = torch.where((banned == -math.inf).all(-1, keepdim=True), logits, banned)
            logits = banned
        tokens = logits.argmax(-1) if temperature == 0 else nucleus_sample(logits, temperature, top_p, generator)
        chosen = tokens.tolist()
        keep = []
        for row, token in enumerate(chosen):
            if token not in stops:
                outputs[active[row]].append(token)
                keep.append(row)
        yield [(active[row], token) for row, token in enumerate(chosen)]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            tokens, mask, positions = tokens[rows], mask[rows], positions[rows]
            seen = seen[rows] if seen is not None else None
            active = [active[row] for row in keep]
        if seen is not None:
            seen[torch.arange(len(active), device=device), tokens] = True
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache}).logits[:, -1]


def keep_only(logits: torch.Tensor, allowed: list[list[int] | None]) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with ``-inf`` everywhere but each row's ``allowed`` token ids (None: the row
    is left as it is)."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for row, tokens in enumerate(allowed):
        if tokens is None:
            mask[row] = True
        else:
            mask[row, tokens] = True
    return logits.masked_fill(~mask, -math.inf)
