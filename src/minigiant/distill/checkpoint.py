"""The resumable training checkpoint of a distillation run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import artifact
from ..progress import log


class Checkpoint:
    """``<work_dir>/checkpoint``: student weights (safetensors), optimizer state and step (weights-only torch file).
    Saving to a temp dir and renaming keeps the previous checkpoint intact until the new one is complete."""

    def __init__(self, work_dir: Path | None, fingerprint: str):
        self.dir = Path(work_dir) / "checkpoint" if work_dir else None
        self.fingerprint = fingerprint

    def save(self, model, optimizer, state: dict, extra=None) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_model

        with artifact.atomic_dir(self.dir) as tmp:
            save_model(model, str(tmp / "student.safetensors"))
            # ``extra``: modules trained beside the student (feature projections), not part of the model.
            torch.save({"optimizer": optimizer.state_dict(), "extra": extra.state_dict() if extra is not None else None}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "fingerprint": self.fingerprint}))

    def load(self, model, optimizer, extra=None) -> dict | None:
        if self.dir is None or not (self.dir / "state.json").is_file():
            return None
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            log(f"[yellow]distill: ignoring checkpoint in {self.dir} (made with other settings)")
            return None
        from safetensors.torch import load_model

        load_model(model, str(self.dir / "student.safetensors"))
        saved = torch.load(self.dir / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        if extra is not None and saved.get("extra") is not None:
            extra.load_state_dict(saved["extra"])
        return state
