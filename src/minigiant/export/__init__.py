"""Export: a minigiant model as one GGUF file for llama.cpp, with an Ollama ``Modelfile`` beside it.

    export(model, tokenizer, "student.gguf", ExportConfig(type="q4_k_m"))

Any float or minigiant-quantized llama-architecture model (pruned shapes included) is written with llama's
GGUF metadata, its byte-level BPE tokenizer and chat template, and its weights in the GGUF type asked for;
per-tensor types follow llama.cpp's ``llama-quantize`` (``tensor_types.py``). Q8_0/Q5_*/Q4_*/TQ2_0 are packed
by the ``gguf`` package (llama.cpp's reference rounding) or, with ``rounding: search``, with a searched scale
by ``blockquants.py``; Q3_K, Q4_K, Q5_K and Q6_K by ``kquants.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import field
from .tensor_types import EXPORT_TYPES, export_type


@dataclass
class ExportConfig:
    type: Optional[str] = field(None, help="GGUF tensor type: " + " | ".join(EXPORT_TYPES) + " (q3_k_m/q4_k_m/q5_k_m: llama.cpp's mixtures, more bits for the head and some attn_v/ffn_down); null: the type the model was quantized for (`quantize --gguf`), else q8_0")
    rounding: Literal["llama.cpp", "search"] = field("llama.cpp", help="llama.cpp: its reference rounding, byte for byte; search: Q8_0/Q5_0/Q4_0 scales with the least weight error (measured: worse perplexity, see docs/export.md)")
    modelfile: bool = field(True, help="also write an Ollama Modelfile beside the .gguf")
    name: Optional[str] = field(None, help="general.name in the GGUF (default: the file name)")

    def validate(self, path: str) -> None:
        if self.type is not None:
            export_type(self.type)


def planned_type(model) -> str | None:
    """The GGUF type ``model``'s quantize stage planned its grids for (``QuantizeConfig.gguf``), if any."""
    from .. import artifact

    for stage in reversed(artifact.lineage(model).get("stages", [])):
        if stage.get("stage") == "quantize":
            return stage.get("settings", {}).get("gguf")
    return None


def export(model, tokenizer, path, config: ExportConfig | None = None) -> dict:
    """Write ``model`` as GGUF at ``path`` (and ``Modelfile`` beside it); return a summary of what was written."""
    from .. import artifact
    from .gguf_file import write_gguf
    from .modelfile import modelfile

    config = dataclasses.replace(config or ExportConfig())
    config.validate("export")
    if config.type is None:
        config.type = planned_type(model) or "q8_0"
    path = Path(path)
    if path.suffix != ".gguf":
        path = path.with_suffix(path.suffix + ".gguf") if path.suffix else path.with_suffix(".gguf")
    report = write_gguf(model, tokenizer, path, export_type(config.type), config.name, config.rounding)
    report["type"] = config.type
    from ..generate import model_decoding

    decoding = model_decoding(model)
    n = decoding["answer_no_repeat_ngram_size"]
    if n:
        from ..progress import log

        report["not_carried"] = [f"answer_no_repeat_ngram_size {n}"]
        log(f"[yellow]export: the model's answer_no_repeat_ngram_size ({n}) has no llama.cpp/Ollama setting; greedy answers there may loop "
            "(llama.cpp's DRY sampler, --dry-multiplier 0.8, is the nearest)")
    if config.modelfile:
        stop = [t for t in (tokenizer.eos_token, "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else None) if t]
        params = {"num_ctx": min(int(model.config.max_position_embeddings), 8192)}
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.do_sample:
            params.update({k: getattr(gen, k) for k in ("temperature", "top_p", "top_k") if getattr(gen, k, None) is not None})
        if decoding["repetition_penalty"] != 1.0:
            params.update({"repeat_penalty": decoding["repetition_penalty"], "repeat_last_n": -1})  # transformers penalizes the whole context
        text = modelfile(path.name, getattr(tokenizer, "chat_template", None) if isinstance(getattr(tokenizer, "chat_template", None), str) else None, stop, params)
        artifact.write_atomic(path.parent / "Modelfile", text)
        report["modelfile"] = str(path.parent / "Modelfile")
    return report


__all__ = ["EXPORT_TYPES", "ExportConfig", "export"]
