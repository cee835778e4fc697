"""serve/: an OpenAI-compatible local server (``app.py``) and a chat CLI (``chat.py``) over one ``Engine``."""

from __future__ import annotations

from ..errors import ConfigError
from .engine import Engine, Piece, Sampling

__all__ = ["Engine", "Piece", "Sampling", "serve"]


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Serve ``model`` (a directory, a .gguf file or 'default') over the OpenAI-compatible API until Ctrl-C."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"port must be in 1-65535, got {port}")
    import uvicorn

    from .app import create_app

    engine = Engine.load(model, name)
    print(f"serving {engine.name} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
