"""Perplexity on held-out text: exp of the mean next-token negative log-likelihood.

The text is cut into non-overlapping windows from its start and each window is scored on its own (no
context carried over), so every model is measured on exactly the same predictions: ``window - 1`` per
window. This is the simple, comparable number, not the lowest one a sliding window would give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..progress import progress


def count_windows(tokens: int, window: int, max_windows: int | None) -> int:
    """How many windows ``tokens`` tokens give; DataError when not even one."""
    if tokens < window:
        raise DataError(f"evaluation text has {tokens} tokens, shorter than one window of {window}; give more text or a smaller window")
    return tokens // window if max_windows is None else min(tokens // window, max_windows)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 1024, max_windows: int | None = 8, on_window=None) -> dict:
    """``{"ppl", "tokens", "windows"}`` of ``model`` on the 1-D token ids ``ids``; ``tokens`` counts the
    predicted positions. ``max_windows=None`` scores every full window of the text. ``on_window(index,
    chunk, logits)`` sees each window's [1, window] ids and the model's [window, vocab] logits on them, so
    another measurement on the same windows (teacher agreement) needs no second forward pass."""
    if ids.dim() != 1:
        raise ValueError(f"perplexity expects 1-D token ids, got shape {tuple(ids.shape)}")
    windows = count_windows(ids.numel(), window, max_windows)
    device = model.device
    total_nll = 0.0
    with progress(transient=True) as bar:
        task = bar.add_task("perplexity", total=windows, info="")
        for i in range(windows):
            chunk = ids[i * window : (i + 1) * window].to(device).unsqueeze(0)
            logits = model(input_ids=chunk, use_cache=False).logits[0]
            # float32 for the softmax even when the model runs in half precision
            total_nll += F.cross_entropy(logits[:-1].float(), chunk[0, 1:], reduction="sum").item()
            if on_window is not None:
                on_window(i, chunk, logits)
            bar.advance(task)
    tokens = windows * (window - 1)
    mean_nll = total_nll / tokens
    ppl = math.inf if mean_nll > 700 else math.exp(mean_nll)  # math.exp overflows past ~709; NaN stays NaN
    return {"ppl": ppl, "tokens": tokens, "windows": windows}
