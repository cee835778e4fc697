"""Shared fixtures: a tiny BPE tokenizer trained offline on shipped text, and tiny random Llama models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MINIGIANT_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the evaluation worker subprocesses
# Tiny models gain nothing from a second thread, and OpenMP threads spinning beside another busy process
# slow small matmuls down 100×; one thread keeps the suite's time steady on a shared 2-core machine.
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minigiant.data.text import DEFAULT_CORPUS

    text = (DEFAULT_CORPUS / "gutenberg_00035_time_machine.txt").read_text()[:60_000]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def interrupt_after(module, calls: int):
    """Make ``module`` raise KeyboardInterrupt from its forward after ``calls`` forwards (a run stopped mid-way,
    for resume tests); returns the hook handle to remove."""
    seen = {"n": 0}

    def hook(module, args, output):
        seen["n"] += 1
        if seen["n"] > calls:
            raise KeyboardInterrupt

    return module.register_forward_hook(hook)


def make_model(vocab_size: int, layers: int = 4, tie: bool = True, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(len(tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer, tiny_model):
    from minigiant import artifact

    return artifact.save(tiny_model, tokenizer, tmp_path / "tiny")
