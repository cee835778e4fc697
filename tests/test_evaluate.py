"""Evaluate: perplexity against HF's own loss, the speed loop against ``generate``, the report files, and
one real worker subprocess. Tiny random models and a word-level tokenizer built here; no network."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigiant import artifact
from minigiant.config import from_dict
from minigiant.errors import ConfigError, DataError, MinigiantError
from minigiant.evaluate import EvaluateConfig, evaluate, evaluate_dirs
from minigiant.evaluate.efficiency import decode_speed, parameter_counts
from minigiant.evaluate.perplexity import perplexity
from minigiant.evaluate.prompts import PROMPTS, answer
from minigiant.evaluate.report import pareto_front, summary_table, write_report

WORDS = "the a cat dog sat on mat is what capital of france paris two three apples and more how many".split()
TEXT = " ".join(WORDS[i * 7 % len(WORDS)] for i in range(400))  # ~400 words, one token each


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["[UNK]", "[EOS]", *WORDS]
    tokens += [f"w{i}" for i in range(256 - len(tokens))]  # every id the model can emit decodes to a word
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    if chat:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}the {% endif %}"
    return tokenizer


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


def test_perplexity_is_exp_of_hf_loss_on_one_window():
    model = tiny_model()
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(0))
    scored = perplexity(model, ids, window=32, max_windows=1)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    assert scored["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert scored["tokens"] == 31 and scored["windows"] == 1


def test_perplexity_windows_do_not_overlap_or_share_context():
    model = tiny_model()
    ids = torch.randint(0, 256, (16 * 3 + 5,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids[:48].view(3, 16)]
    every = perplexity(model, ids, window=16, max_windows=None)
    assert (every["windows"], every["tokens"]) == (3, 45)  # the 5-token tail is not scored
    assert every["ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    first_two = perplexity(model, ids, window=16, max_windows=2)
    assert (first_two["windows"], first_two["tokens"]) == (2, 30)
    assert first_two["ppl"] == pytest.approx(math.exp(sum(losses[:2]) / 2), rel=1e-5)


def test_perplexity_of_too_short_text_is_a_data_error():
    with pytest.raises(DataError, match="shorter than one window"):
        perplexity(tiny_model(), torch.arange(10), window=16)


def test_decode_speed_generates_the_requested_tokens_greedily():
    model = tiny_model()
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))
    speed = decode_speed(model, prompt, new_tokens=8)
    assert speed["tokens"] == 8
    assert speed["ttft_s"] > 0 and speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
    expected = model.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert speed["generated"] == expected[0, 12:].tolist()  # the cached loop decodes what generate does


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.window"):
        from_dict(EvaluateConfig, {"window": 1}, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate\.speed_tokens"):
        from_dict(EvaluateConfig, {"speed_tokens": 1}, "evaluate")
    assert from_dict(EvaluateConfig, {"speed_tokens": 0}, "evaluate").speed_tokens == 0


@pytest.mark.parametrize("chat", [False, True])
def test_answer_decodes_only_new_tokens(chat):
    tokenizer = tiny_tokenizer(chat)
    model = tiny_model()
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # LlamaConfig's default end token (2) is a word here
    reply = answer(model, tokenizer, "what is the capital of france", max_new_tokens=5)
    assert isinstance(reply, str) and 0 < len(reply.split()) <= 5
    assert "[EOS]" not in reply


def test_evaluate_in_process_returns_flat_json_serialisable_metrics(text_file):
    model = tiny_model()
    config = EvaluateConfig(text=str(text_file), window=32, max_windows=2, max_new_tokens=4, speed_tokens=4)
    result = evaluate(model, tiny_tokenizer(), config)
    assert json.loads(json.dumps(result)) == result
    assert result["params"] == parameter_counts(model)["params"] > result["non_embedding_params"] > 0
    assert result["disk_bytes"] is None and result["path"] is None
    assert result["ppl_tokens"] == 2 * 31 and result["perplexity"] > 1
    assert result["peak_rss_mb"] > 0 and result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert [a["prompt"] for a in result["answers"]][:4] == list(PROMPTS)  # the shipped instructions start with the fixed prompts


def test_evaluate_rejects_text_shorter_than_a_window(text_file):
    config = EvaluateConfig(text=str(text_file), window=1024, max_windows=1)
    with pytest.raises(DataError):
        evaluate(tiny_model(), tiny_tokenizer(), config)


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 10.0), (50, 12.0), (60, 15.0), (20, 30.0), (50, 12.0), (120, 9.0), (130, 9.0)]
    # (60, 15) is beaten by (50, 12); the second (50, 12) duplicates the first; (130, 9) by (120, 9)
    assert pareto_front(points) == [3, 1, 0, 5]
    assert pareto_front([]) == []


def fake_results() -> list[dict]:
    def result(name, size_mb, ppl, answer_text):
        return {
            "name": name, "path": f"/runs/{name}", "lineage_stages": ["load", name], "params": 1_000_000, "non_embedding_params": 600_000,
            "disk_bytes": int(size_mb * 1024 * 1024), "perplexity": ppl, "ppl_tokens": 8184, "peak_rss_mb": 900.0, "ttft_s": 0.05,
            "prefill_tokens_per_s": 2000.0, "decode_tokens_per_s": 40.0, "answers": [{"prompt": PROMPTS[0], "answer": answer_text}],
        }

    return [result("teacher", 540, 12.5, "Paris."), result("int8", 140, 13.1, "Paris | France"), result("int4", 80, 16.0, "It is\nParis")]


def test_report_writes_markdown_json_and_plot(tmp_path):
    results = fake_results()
    paths = write_report(results, tmp_path / "report", "test run")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved["reference"] == "teacher" and saved["models"] == results
    text = paths["markdown"].read_text()
    assert "# test run" in text and "(0.26×)" in text  # int8's disk size relative to the teacher
    assert "Paris \\| France" in text and "It is<br>Paris" in text  # answers cannot break the table
    assert not list((tmp_path / "report").glob(".*tmp*"))  # no temp files left behind


def test_summary_table_has_one_row_per_model():
    assert summary_table(fake_results()).row_count == 3


def test_evaluate_dirs_runs_one_worker_per_model(tmp_path, text_file):
    model = tiny_model()
    artifact.record_stage(model, "load", {"source": "test"})
    model_dir = artifact.save(model, tiny_tokenizer(), tmp_path / "tiny")
    config = EvaluateConfig(text=str(text_file), window=32, max_windows=1, prompts=False, speed_tokens=4)
    [result] = evaluate_dirs({"tiny": model_dir}, config, tmp_path / "out")
    assert result["name"] == "tiny" and result["lineage_stages"] == ["load"]
    assert result["disk_bytes"] == artifact.weights_size_bytes(model_dir) > 0
    assert result["ppl_tokens"] == 31 and result["peak_rss_mb"] > 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "report.json", "report.html", "pareto.png", "pareto-speed.png", ".evaluate-cache"}  # no temp files

    with pytest.raises(MinigiantError, match="evaluating broken .*no config.json"):
        (tmp_path / "broken").mkdir()
        evaluate_dirs({"broken": tmp_path / "broken"}, config, tmp_path / "out2")


def test_peak_rss_of_a_worker_is_its_own_not_its_parents():
    """ru_maxrss survives fork+exec on Linux; a worker must not report the parent's (larger) peak."""
    import subprocess
    import sys
    from pathlib import Path

    ballast = bytearray(400 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page so it is resident
    code = "from minigiant.evaluate.efficiency import peak_rss_mb; print(peak_rss_mb())"
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src, "PATH": ""}, check=True)
    assert float(out.stdout) < 300  # a bare interpreter + torch import, far below the parent's 400+ MB
    del ballast


def test_report_plots_the_healing_curve_when_a_model_recorded_one(tmp_path):
    from minigiant.evaluate import distill_curve

    lineage = {"stages": [{"stage": "prune", "metrics": {}}, {"stage": "distill", "metrics": {"eval_curve": [[0.0, 0, 198.1], [2.5, 10, 140.0], [5.0, 20, 120.2]]}}]}
    assert distill_curve(lineage) == [[0.0, 0, 198.1], [2.5, 10, 140.0], [5.0, 20, 120.2]]
    assert distill_curve({"stages": [{"stage": "distill", "metrics": {"eval_curve": []}}]}) is None
    results = fake_results()
    paths = write_report(results, tmp_path / "plain", "test run")
    assert "healing_plot" not in paths and not (tmp_path / "plain" / "healing.png").exists()
    results[1]["distill_curve"] = distill_curve(lineage)
    paths = write_report(results, tmp_path / "healed", "test run")
    assert paths["healing_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["html"].read_text().count("data:image/png;base64,") == 3  # size, speed and healing plots
    # A quantized copy inherits its student's curve: one line for both, named after both.
    from minigiant.evaluate.report import healing_curves

    results[2]["distill_curve"] = distill_curve(lineage)
    other = [[0.0, 0, 300.0], [1.0, 5, 200.0]]
    results.append({**results[2], "name": "other", "distill_curve": other})
    assert healing_curves(results) == [(f"{results[1]['name']} (same run: {results[2]['name']})", distill_curve(lineage)), ("other", other)]
