"""``minigiant chat MODEL``: talk to a model in the terminal, its answers streamed, the conversation kept.

Lines starting with ``/`` are commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) leaves.
When the conversation no longer fits the model's context with room for an answer, the oldest turns are
dropped (the system message stays), as chat front-ends do.
"""

from __future__ import annotations

from typing import TextIO

from ..errors import MinigiantError
from .engine import Engine, Sampling

HELP = "/reset forgets the conversation, /exit leaves"


def fit_to_context(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int]]:
    """``messages`` without their oldest user/assistant turns until the prompt leaves ``max_tokens`` of context,
    and the prompt's token ids."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    ids = engine.chat_ids(system + turns)
    while engine.context and len(turns) > 1 and len(ids) + max_tokens > engine.context:
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # a user message and the answer to it
        ids = engine.chat_ids(system + turns)
    return system + turns, ids


def chat_loop(engine: Engine, sampling: Sampling, system: str | None, lines, out: TextIO) -> list[dict]:
    """Answer each line of ``lines`` in turn, writing the answers to ``out``; returns the conversation. A line
    the model cannot answer (too long for its context) gets the one-line reason and the chat goes on."""
    messages = [{"role": "system", "content": system}] if system else []
    out.write(f"chatting with {engine.name} ({HELP})\n")
    out.flush()
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation forgotten)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line!r}: {HELP}\n")
            continue
        asked, ids = fit_to_context(engine, messages + [{"role": "user", "content": line}], sampling.max_tokens)
        answer = ""
        try:
            for piece in engine.stream(ids, sampling):
                answer += piece.text
                out.write(piece.text)
                out.flush()
        except MinigiantError as error:
            out.write(f"error: {error}\n")
            continue
        out.write("\n")
        messages = asked + [{"role": "assistant", "content": answer}]
    return messages


def terminal_lines(prompt: str = "> "):
    """Lines typed at the terminal (with line editing where ``readline`` exists) until end of input."""
    try:
        import readline  # noqa: F401  (input() then gets history and editing)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return
