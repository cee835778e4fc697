"""An exported GGUF runs in llama.cpp (llama-cpp-python, the optional extra ``minigiant[llamacpp]``): the same
logits and greedy tokens as our torch model. Skipped where llama_cpp is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

llama_cpp = pytest.importorskip("llama_cpp")

from minigiant.export import ExportConfig, export  # noqa: E402


def _engine(path, logits_all=False):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, n_threads_batch=1, logits_all=logits_all, verbose=False)


@pytest.mark.parametrize("kind, atol", [("f32", 1e-3), ("q8_0", 0.1)])
def test_llama_cpp_runs_the_export_like_torch(tmp_path, tokenizer, kind, atol):
    model = make_model(len(tokenizer), hidden=64)
    ids = torch.randint(4, len(tokenizer), (20,), generator=torch.Generator().manual_seed(3)).tolist()
    path = tmp_path / f"tiny-{kind}.gguf"
    export(model, tokenizer, path, ExportConfig(type=kind, modelfile=False))

    engine = _engine(path, logits_all=True)
    engine.eval(ids)
    theirs = np.asarray(engine.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < atol

    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = []
    for token in engine.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(token))
        if len(got) == 12:
            break
    assert got == expected


def test_llama_cpp_runs_gptq_codes_planned_for_q4_0_like_our_quantized_model(tmp_path, tokenizer):
    from minigiant.context import Context
    from minigiant.quantize import QuantizeConfig, quantize

    model = make_model(len(tokenizer), hidden=64)
    ids = torch.randint(4, len(tokenizer), (20,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0].numpy()
    quantize(model, QuantizeConfig(method="gptq", gguf="q4_0", calibration_tokens=1024, calibration_block=128, ppl_text=None), Context(tokenizer=tokenizer))
    path = tmp_path / "tiny-gptq-q4_0.gguf"
    assert export(model, tokenizer, path, ExportConfig(modelfile=False))["exact_tensors"] == 1 + 4 * 7

    engine = _engine(path, logits_all=True)
    engine.eval(ids)
    theirs = np.asarray(engine.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp runs the very weights of our quantized model (it only rounds activations to 8 bits), not the float ones
    assert np.abs(theirs - ours).max() < 0.1
    assert np.abs(theirs - ours).max() < np.abs(theirs - float_logits).max() / 2
