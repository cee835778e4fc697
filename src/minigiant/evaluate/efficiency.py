"""What a model costs to run: parameters, peak memory and generation speed (its bytes on disk are
``artifact.weights_size_bytes``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..generate import cache_keyword
from ..models.architecture import non_embedding_parameters, total_parameters


def parameter_counts(model) -> dict:
    """Distinct parameters (tied weights once; packed quantized weights at their logical size)."""
    return {"params": total_parameters(model), "non_embedding_params": non_embedding_parameters(model)}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (a high-water mark: it never goes down).

    On Linux it is ``VmHWM`` from /proc: ``ru_maxrss`` survives fork and exec, so a worker started by a
    process holding 5 GB reported 5 GB whatever model it loaded (seen in the default run).
    """
    import resource  # Unix only

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_mib = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return peak / per_mib


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously; time only finished work


def _next_token(model, ids: torch.Tensor, cache) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def decode_speed(model, prompt_ids: torch.Tensor, new_tokens: int = 64) -> dict:
    """Greedy generation of ``new_tokens`` tokens after ``prompt_ids`` with a KV cache, timed in two parts:
    the prefill (the whole prompt, ending in the first new token: time to first token) and the decode of
    the remaining ``new_tokens - 1`` tokens one at a time.

    Returns ``ttft_s``, ``prefill_tokens_per_s``, ``decode_tokens_per_s`` (None when ``new_tokens`` is 1),
    ``tokens`` (how many were generated) and ``generated`` (their ids).
    """
    from transformers import DynamicCache

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    device = model.device
    prompt = prompt_ids.reshape(1, -1).to(device)

    # Warm-up, one prefill and one decode step: first calls pay for lazy initialisation (kernel
    # selection, allocator growth), which is not the model's speed.
    warm_cache = DynamicCache(config=model.config)
    _next_token(model, _next_token(model, prompt[:, :2], warm_cache), warm_cache)

    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    token = _next_token(model, prompt, cache)
    _sync(device)
    first = time.perf_counter()
    generated = [token]
    for _ in range(new_tokens - 1):
        token = _next_token(model, token, cache)
        generated.append(token)
    _sync(device)
    end = time.perf_counter()

    ttft = first - start
    decode_s = end - first
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt.shape[1] / ttft,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "tokens": len(generated),
        "generated": torch.cat(generated, dim=1)[0].tolist(),
    }
