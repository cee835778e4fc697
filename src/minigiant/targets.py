"""Which modules a technique touches: one helper shared by every method.

``targets``: ``"all-linear"`` (every ``nn.Linear`` except the output head), a list of names/suffixes
(``["q_proj", "v_proj"]``) or ``"re:<pattern>"`` entries matched against the full module name.
``ignore`` uses the same forms and wins over ``targets``.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError


def matches(name: str, patterns: str | list[str]) -> bool:
    """Whether the module name ``name`` matches any of ``patterns`` (names/suffixes or ``re:<regex>``)."""
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name) is not None:
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def select_modules(model: nn.Module, targets: str | list[str] = "all-linear", ignore: list[str] | None = None, kinds: tuple[type, ...] = (nn.Linear,)) -> list[tuple[str, nn.Module]]:
    ignore = list(ignore or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patterns = None if targets == "all-linear" else ([targets] if isinstance(targets, str) else list(targets))
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if patterns is None:
            if module is head:
                continue  # the output head is chosen explicitly (it is often tied to the embedding)
        elif not matches(name, patterns):
            continue
        if matches(name, ignore):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ConfigError(f"targets {targets!r} (ignore {ignore!r}) match no module of {type(model).__name__}; use 'all-linear', module names like 'q_proj', or 're:<regex>'")
    return chosen
