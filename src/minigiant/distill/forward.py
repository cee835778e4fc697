"""Running part of a decoder stack: the teacher's layers that a depth-pruned student still shares unchanged
are run once, and both models continue from their output.

A student made by dropping layers keeps the teacher's embedding and every layer before the first removed one
bit for bit. Those layers are found by comparing weights (never assumed from the lineage), frozen in the
student, and run once per batch for both models instead of three times (teacher forward, student forward and
backward). The split forward is checked against the full one on a short input before it is used, so an
architecture whose stack does not split this way (e.g. one that rescales ``inputs_embeds``) falls back to the
full forward instead of training on wrong activations.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.architecture import _find_layers, decoder_layers


def base_model(model: nn.Module) -> nn.Module:
    """The decoder (embeddings → layers → final norm) under a causal-LM head."""
    return model.base_model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def shared_prefix_layers(student: nn.Module, teacher: nn.Module) -> int:
    """How many leading decoder layers (with the input embedding) student and teacher have with equal weights."""
    if type(student) is not type(teacher) or not _same(student.get_input_embeddings(), teacher.get_input_embeddings()):
        return 0
    count = 0
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    for i, (s, t) in enumerate(zip(s_layers, t_layers)):
        # A layer whose weights a later layer also runs (cross-layer sharing) must stay trainable.
        later = {id(p) for layer in s_layers[i + 1 :] for p in layer.parameters()}
        if not _same(s, t) or any(id(p) in later for p in s.parameters()):
            break
        count += 1
    # Leave the student at least one layer to train (a student equal to its teacher shares everything).
    return min(count, len(s_layers) - 1, len(t_layers) - 1)


@contextlib.contextmanager
def layer_range(model: nn.Module, start: int, stop: int | None, final_norm: bool = True):
    """Temporarily keep only decoder layers ``start:stop`` (and drop the final norm when ``final_norm`` is
    False), so ``base_model(model)(inputs_embeds=h)`` runs that slice of the stack."""
    parent, attr = _find_layers(model)
    layers = getattr(parent, attr)
    base = base_model(model)
    norm = getattr(base, "norm", None)
    setattr(parent, attr, nn.ModuleList(list(layers)[start:stop]))
    if not final_norm and norm is not None:
        base.norm = nn.Identity()
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        if norm is not None:
            base.norm = norm


def prefix_hidden(teacher: nn.Module, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """The hidden state after the teacher's first ``layers`` decoder layers (before any final norm)."""
    with layer_range(teacher, 0, layers, final_norm=False):
        return base_model(teacher)(input_ids=ids, use_cache=False).last_hidden_state


def final_hidden(model: nn.Module, ids: torch.Tensor, prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """The final (normed) hidden state; from ``prefix`` (the hidden state after layer ``start``) when given."""
    if prefix is None:
        return base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    with layer_range(model, start, None):
        return base_model(model)(inputs_embeds=prefix, use_cache=False).last_hidden_state


@torch.no_grad()
def split_forward_matches(model: nn.Module, layers: int, vocab_size: int) -> bool:
    """Whether running layers ``:layers`` then ``layers:`` gives the full forward's hidden state."""
    ids = torch.arange(16).remainder(vocab_size).unsqueeze(0)
    dtype = next(model.parameters()).dtype
    full = final_hidden(model, ids).float()
    split = final_hidden(model, ids, prefix_hidden(model, ids, layers), layers).float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return torch.allclose(full, split, atol=tolerance * full.abs().max().item(), rtol=0)
