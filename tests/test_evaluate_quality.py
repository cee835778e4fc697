"""Evaluation of quality: lm-eval tasks (shipped YAMLs, a user's YAML, bad YAMLs, the GSM8K answer filter,
the per-task cache), teacher agreement, chat metrics, and the HTML report. Tiny random models and task
files made here; no network."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from minigiant import artifact
from minigiant.errors import ConfigError, DataError
from minigiant.evaluate import EvaluateConfig, evaluate, evaluate_dirs
from minigiant.evaluate import chat as chat_module
from minigiant.evaluate.agreement import teacher_agreement
from minigiant.evaluate.chat import chat_quality, completes_repeat, judge_token_nlls, length_batches, load_instructions, repeated_ngram_rate, standard_error
from minigiant.evaluate.harness import TASKS_DIR, answer_filters, evaluate_tasks, load_task_file, resolve_tasks, shipped_tasks

from conftest import make_model

ARC_ROWS = [
    {"query": "Question: What do plants need to grow?", "choices": ["light", "rocks", "plastic"], "gold": 0},
    {"query": "Question: Which is a mammal?", "choices": ["shark", "dog", "trout"], "gold": 1},
    {"query": "Question: What melts ice?", "choices": ["heat", "cold", "dark"], "gold": 0},
    {"query": "Question: What falls from clouds?", "choices": ["rain", "sand", "glass"], "gold": 0},
]
GSM_ROWS = [
    {"question": "Ann has 2 pens and buys 3 more. How many pens does she have?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "A box holds 4 eggs. How many eggs are in 2 boxes?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "arc_easy" / "dev.jsonl", ARC_ROWS)
    write_jsonl(root / "gsm8k" / "train.jsonl", GSM_ROWS * 3)
    write_jsonl(root / "gsm8k" / "dev.jsonl", GSM_ROWS)
    return root


def test_every_shipped_task_is_valid_lm_eval_config():
    from lm_eval.config.task import TaskConfig

    assert set(shipped_tasks()) >= {"hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "sst2", "gsm8k"}
    for name in shipped_tasks():
        with pytest.raises(DataError, match=rf"{name}.*data file not found: .*nowhere"):
            load_task_file(TASKS_DIR / f"{name}.yaml", "/nowhere")
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in shipped_tasks():
        TaskConfig(**load_yaml(TASKS_DIR / f"{name}.yaml"))  # lm-eval accepts every key


def test_shipped_task_scores_through_lm_eval_with_stderr_and_is_cached(tmp_path, data_dir, tokenizer):
    model = make_model(len(tokenizer), layers=2)
    specs = resolve_tasks(["arc_easy"], data_dir)
    first = evaluate_tasks(model, tokenizer, specs, limit=3, batch_size=4, cache_dir=tmp_path / "cache", model_fingerprint="m1")
    summary = first["arc_easy"]
    assert summary["samples"] == 3 and summary["primary"] == "acc_norm"
    for metric in ("acc", "acc_norm"):
        value, stderr = summary["metrics"][metric]["value"], summary["metrics"][metric]["stderr"]
        assert value in (0, 1 / 3, 2 / 3, 1) and stderr is not None
    # the same request again is read from the cache: an lm-eval run would need a model
    again = evaluate_tasks(None, None, specs, limit=3, cache_dir=tmp_path / "cache", model_fingerprint="m1")
    assert again == first
    assert len(list((tmp_path / "cache").glob("task-arc_easy-*.json"))) == 1


def test_lm_eval_accuracy_matches_a_hand_computed_loglikelihood_choice(data_dir, tokenizer):
    """acc is the share of questions whose gold choice has the highest summed log-probability after
    "<query>\\nAnswer:" + " " (lm-eval's target delimiter): recomputed here with the model directly."""
    model = make_model(len(tokenizer), layers=2, seed=3)
    [summary] = evaluate_tasks(model, tokenizer, resolve_tasks(["arc_easy"], data_dir), batch_size=2).values()
    correct = 0
    for row in ARC_ROWS:
        context = tokenizer(row["query"] + "\nAnswer:")["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["query"] + "\nAnswer: " + choice)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            cont = range(len(context), len(whole))
            scores.append(sum(logp[i - 1, whole[i]].item() for i in cont))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
    assert summary["metrics"]["acc"]["value"] == pytest.approx(correct / len(ARC_ROWS))


def test_gsm8k_generates_and_scores_exact_match(data_dir, tokenizer):
    model = make_model(len(tokenizer), layers=2)
    specs = resolve_tasks(["gsm8k"], data_dir)
    [summary] = evaluate_tasks(model, tokenizer, specs, limit=2, num_fewshot=1, batch_size=2).values()
    assert summary["num_fewshot"] == 1 and summary["samples"] == 2
    assert summary["metrics"]["exact_match,strict-match"]["value"] == 0.0  # a random model answers nothing right
    assert summary["primary"] == "exact_match,strict-match"


# (completion a model might write, what strict-match extracts, what flexible-extract extracts, correct for gold 18?)
GSM8K_COMPLETIONS = [
    ("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", "18", True),
    ("9 eggs at $2 each is $18.\n#### $18", "[invalid]", "$18", False),  # strict wants a number right after ####
    ("She makes 9 * 2 = 18 dollars every day.", "[invalid]", "18", False),
    ("#### 1,018", "1,018", "1,018", False),  # the comma is ignored when comparing, 1018 ≠ 18
    ("The answer is 18.\n\nQuestion: Tom has", "[invalid]", "18.", False),
    ("#### -3", "-3", "-3", False),
    ("I do not know.", "[invalid]", "[invalid]", False),
    ("#### 18.\nThen 4 more", "18.", "4", True),  # the trailing period is ignored; strict takes the first match
]


@pytest.mark.parametrize("completion, strict, flexible, correct", GSM8K_COMPLETIONS)
def test_gsm8k_answer_filter_on_real_looking_completions(completion, strict, flexible, correct):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    spec = load_task_file(TASKS_DIR / "gsm8k.yaml", _gsm8k_data(tmp_dir=None))
    filters = answer_filters(spec.config)
    assert filters["strict-match"](completion) == strict
    assert filters["flexible-extract"](completion) == flexible
    options = {k: v for k, v in spec.config["metric_list"][0].items() if k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    gold = "16 - 3 - 4 = 9 eggs a day, 9 * 2 = 18\n#### 18"  # the reference is the whole solution; #### ... is stripped
    score = exact_match_hf_evaluate(predictions=[strict], references=[gold], **options)["exact_match"]
    assert score == (1.0 if correct else 0.0)


def _gsm8k_data(tmp_dir):
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp())
    write_jsonl(root / "gsm8k" / "train.jsonl", GSM_ROWS)
    write_jsonl(root / "gsm8k" / "dev.jsonl", GSM_ROWS)
    return root


def test_a_users_task_yaml_runs_and_bad_ones_say_what_is_wrong(tmp_path, tokenizer):
    write_jsonl(tmp_path / "mine.jsonl", [{"text": "The sky is", "options": ["blue", "loud"], "answer": 0}] * 3)
    good = tmp_path / "my_task.yaml"
    good.write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mine.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_target: answer\ndoc_to_choice: '{{options}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    [summary] = evaluate_tasks(make_model(len(tokenizer), layers=2), tokenizer, resolve_tasks([str(good)]), batch_size=2).values()
    assert summary["task"] == "my_task" and summary["samples"] == 3

    cases = {
        "doc_to_text: '{{text}}'": ("doc_to_text: '{{txt}}'", r"doc_to_text uses \{\{txt\}\}, which is not a column .*did you mean 'text'"),
        "doc_to_target: answer": ("doc_to_target: answr", r"doc_to_target names column 'answr'"),
        "dataset_path: json\n": ("", r"missing required field 'dataset_path'"),
        "output_type: multiple_choice": ("output_typ: multiple_choice", r"unknown task key 'output_typ'; did you mean 'output_type'"),
        "test: mine.jsonl": ("test: missing.jsonl", r"data file not found: .*missing.jsonl"),
        "doc_to_choice: '{{options}}'\n": ("", r"multiple_choice task needs doc_to_choice"),
    }
    for old, (new, message) in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(good.read_text().replace(old, new))
        with pytest.raises((ConfigError, DataError), match=message):
            resolve_tasks([str(bad)])
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="could not be read"):
        resolve_tasks([str(tmp_path / "broken.yaml")])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_tasks([str(tmp_path / "absent.yaml")])


def test_agreement_of_a_model_with_itself_is_one_and_kl_zero(tokenizer):
    model = make_model(len(tokenizer), layers=2)
    ids = torch.randint(0, len(tokenizer), (70,), generator=torch.Generator().manual_seed(0))
    same = teacher_agreement(model, model, ids, window=32, max_windows=2)
    assert same["top1_agreement"] == 1.0 and same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and same["agreement_tokens"] == 64
    other = teacher_agreement(make_model(len(tokenizer), layers=2, seed=1), model, ids, window=32, max_windows=2)
    assert other["top1_agreement"] < 1.0 and other["kl_teacher_student"] > 0


def test_evaluate_measures_agreement_from_the_perplexity_pass(tokenizer, tmp_path):
    """The student runs once per window: agreement reuses the perplexity pass's logits and gives the numbers
    a separate pass gives; only the teacher runs again."""
    student, teacher = make_model(len(tokenizer), layers=2, seed=1), make_model(len(tokenizer), layers=2)
    ids = torch.randint(0, len(tokenizer), (200,), generator=torch.Generator().manual_seed(0))
    text = tmp_path / "text.txt"
    text.write_text(tokenizer.decode(ids))
    calls = {"student": 0, "teacher": 0}
    for name, m in (("student", student), ("teacher", teacher)):
        m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    config = EvaluateConfig(text=str(text), window=32, max_windows=3, agreement_windows=2, prompts=False, speed_tokens=0)
    result = evaluate(student, tokenizer, config, teacher=teacher)
    assert calls == {"student": 3, "teacher": 2}
    from minigiant.data.text import tokenize_documents

    separate = teacher_agreement(student, teacher, tokenize_documents(tokenizer, [text.read_text()]), window=32, max_windows=2)
    assert {k: result[k] for k in separate} == pytest.approx(separate)
    assert result["agreement_tokens"] == 64


def test_students_read_the_teachers_shared_logits_and_get_the_online_numbers(tokenizer, tmp_path, monkeypatch):
    """The teacher's own evaluation writes its window logits; a student's agreement then reads them instead of
    running the teacher, with the numbers the online teacher gives. Windows past the disk budget are not
    written; a window whose ids differ (another text) runs the teacher."""
    from minigiant.evaluate.agreement import Agreement

    teacher, student = make_model(len(tokenizer), layers=2), make_model(len(tokenizer), layers=2, seed=1)
    ids = torch.randint(0, len(tokenizer), (64,), generator=torch.Generator().manual_seed(0))
    chunks = [ids[:32].unsqueeze(0), ids[32:].unsqueeze(0)]
    with torch.inference_mode():
        t_logits = [teacher(input_ids=c, use_cache=False).logits[0] for c in chunks]
        s_logits = [student(input_ids=c, use_cache=False).logits[0] for c in chunks]
    shared = tmp_path / "shared"
    own = Agreement(teacher, teacher, shared)
    for i, (c, logits) in enumerate(zip(chunks, t_logits)):
        own.add(c, logits, i)
    assert own.result()["top1_agreement"] == 1.0 and sorted(p.name for p in shared.iterdir()) == ["window-0.safetensors", "window-1.safetensors"]

    online = Agreement(teacher, student)
    for i, (c, logits) in enumerate(zip(chunks, s_logits)):
        online.add(c, logits, i)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    reader = Agreement(teacher, student, shared)
    for i, (c, logits) in enumerate(zip(chunks, s_logits)):
        reader.add(c, logits, i)
    assert calls == [] and reader.result() == online.result()

    from minigiant.evaluate import agreement as agreement_module

    capped = tmp_path / "capped"
    monkeypatch.setattr(agreement_module, "SHARED_LOGITS_BYTES", t_logits[0].numel() * 4)  # room for one window
    own = Agreement(teacher, teacher, capped)
    for i, (c, logits) in enumerate(zip(chunks, t_logits)):
        own.add(c, logits, i)
    assert sorted(p.name for p in capped.iterdir()) == ["window-0.safetensors"]

    other = torch.flip(chunks[0], dims=[1])
    with torch.inference_mode():
        Agreement(teacher, student, shared).add(other, student(input_ids=other, use_cache=False).logits[0], 0)
    assert calls == [1]


def test_kl_matches_the_formula_on_one_position():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits, self.device = torch.tensor(logits), torch.device("cpu")

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": self.logits.expand(1, input_ids.shape[1], -1)})()

    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]

    result = teacher_agreement(Fixed([math.log(x) for x in q]), Fixed([math.log(x) for x in p]), torch.arange(2), window=2, max_windows=1)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(teacher p ‖ student q) = 0.5 ln 2 − 0.25 ln 2
    assert result["kl_teacher_student"] == pytest.approx(expected, rel=1e-5)
    assert result["top1_agreement"] == 0.0  # argmax 0 vs 1


def test_repeated_4gram_rate_by_hand():
    assert repeated_ngram_rate(["a b c d a b c d"]) == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd: one repeat
    assert repeated_ngram_rate(["a b c d e"]) == 0.0
    assert repeated_ngram_rate(["x x x x x x"]) == pytest.approx(2 / 3)  # three 4-grams, all "x x x x", two repeat
    assert repeated_ngram_rate(["a b c d", "a b c d"]) == 0.0  # repeats are counted within an answer, not across
    assert repeated_ngram_rate(["a b c d a b c d", "p q r s t"]) == pytest.approx(1 / 7)
    assert repeated_ngram_rate(["", "too short"]) is None


def test_an_answer_keeps_the_end_token_the_model_chose(tokenizer):
    """With several end tokens, the judged answer ends with the one the model emitted, not the tokenizer's EOS."""
    model = make_model(len(tokenizer), layers=2, tie=False)
    free = chat_module.answer_instructions(model, tokenizer, ["Tell me a story."], max_new_tokens=8)[0]
    assert free["truncated"] and len(free["answer_ids"]) == 8
    chosen = free["answer_ids"][3]
    other = next(t for t in range(len(tokenizer)) if t not in free["answer_ids"] and t != tokenizer.eos_token_id)
    model.generation_config.eos_token_id = [other, chosen]
    ended = chat_module.answer_instructions(model, tokenizer, ["Tell me a story."], max_new_tokens=8)[0]
    cut = free["answer_ids"].index(chosen)
    assert ended["answer_ids"] == free["answer_ids"][:cut] + [chosen] and not ended["truncated"]
    assert chosen != tokenizer.eos_token_id


def test_chat_quality_judges_answers_and_counts_truncation(tokenizer):
    model = make_model(len(tokenizer), layers=2)
    prompts = ["What is the time machine?", "Tell me a story."]
    chat = chat_quality(model, tokenizer, model, prompts, max_new_tokens=6)
    assert [a["prompt"] for a in chat["chat_answers"]] == prompts
    assert chat["chat_truncated_rate"] == 1.0  # a random model does not stop within 6 tokens
    assert chat["chat_judge_nll"] > 0 and chat["chat_empty_rate"] in (0.0, 0.5, 1.0)
    nlls = [a["judge_nll"] for a in chat["chat_answers"]]
    assert chat["chat_judge_nll"] == pytest.approx(sum(nlls) / 2) and chat["chat_judge_nll_stderr"] == pytest.approx(abs(nlls[0] - nlls[1]) / 2)


def test_judge_token_nlls_batched_equal_one_answer_at_a_time(tokenizer, monkeypatch):
    judge = make_model(len(tokenizer), layers=2)
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([3, 4], []), ([20, 21, 22, 23, 24], [25])]
    scores = judge_token_nlls(judge, pairs, batch_size=3)  # two batches, right padding of different widths
    monkeypatch.setattr(chat_module, "LOGITS_BUDGET", 1)  # logits of long prompts over the budget: one row a batch
    assert [pytest.approx(row, abs=1e-5) for row in judge_token_nlls(judge, pairs, batch_size=3)] == scores
    for (prompt, answer), score in zip(pairs, scores):
        ids = torch.tensor([prompt + answer])
        logits = judge(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = -torch.log_softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer, dtype=torch.long)]
        assert score == pytest.approx(expected.tolist(), abs=1e-5)  # [] for the empty answer
    with pytest.raises(ValueError, match="prompt of at least one token"):
        judge_token_nlls(judge, [([], [8, 9])])


def test_completes_repeat_marks_the_tokens_that_close_a_known_ngram():
    assert completes_repeat([1, 2, 1, 2, 1], 2) == [False, False, False, True, True]
    assert completes_repeat([1, 2, 3, 4, 1, 2, 3, 4, 5], 4) == [False] * 7 + [True, False]
    assert completes_repeat([7, 7, 7, 7, 7], 4) == [False, False, False, False, True]
    assert completes_repeat([1, 2], 4) == [False, False]


def test_chat_judge_nll_fresh_leaves_out_the_loop_tokens(tokenizer, monkeypatch):
    judge = make_model(len(tokenizer), layers=2)
    loop = [11, 12, 13, 14, 11, 12, 13, 14, 15]  # only token 7 closes a 4-gram already there (11 12 13 14)
    answers = [{"prompt": "p", "answer": "x", "ids": [5, 6], "answer_ids": loop, "truncated": True},
               {"prompt": "q", "answer": "y", "ids": [7], "answer_ids": [20, 21, 22], "truncated": False}]
    monkeypatch.setattr(chat_module, "answer_instructions", lambda *args: [dict(a) for a in answers])
    chat = chat_quality(judge, tokenizer, judge, ["p", "q"])
    nlls = judge_token_nlls(judge, [(a["ids"], a["answer_ids"]) for a in answers])
    fresh_first = [n for j, n in enumerate(nlls[0]) if j != 7]  # [11 12 13 14] comes back only at index 7
    assert chat["chat_answers"][0]["judge_nll"] == pytest.approx(sum(nlls[0]) / 9)
    assert chat["chat_answers"][0]["judge_nll_fresh"] == pytest.approx(sum(fresh_first) / 8)
    assert chat["chat_answers"][1]["judge_nll_fresh"] == pytest.approx(chat["chat_answers"][1]["judge_nll"])  # no repeat
    assert chat["chat_judge_nll_fresh"] == pytest.approx((sum(fresh_first) / 8 + sum(nlls[1]) / 3) / 2)


def test_length_batches_group_similar_lengths_within_rows_and_tokens():
    # sorted: 3 (index 2), 4 (4), 5 (0), 50 (3), 100 (1); two rows at most, padded to the longest ≤ 120 tokens
    assert length_batches([5, 100, 3, 50, 4], max_rows=2, max_tokens=120) == [[2, 4], [0, 3], [1]]
    assert length_batches([300, 10], max_rows=16, max_tokens=200) == [[1], [0]]  # too long for any batch: alone


def test_standard_error_by_hand():
    # [1, 2, 3, 4]: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, error sqrt(5/3 / 4)
    assert standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 12))
    assert standard_error([2.0]) is None and standard_error([]) is None


def test_instruction_files(tmp_path):
    assert len(load_instructions("builtin")) == 64
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Say hi", "context": "to Ann"}\n\n{"prompt": "Count to 3"}\nnot json\n{"response": "x"}\n')
    assert load_instructions(str(path)) == ["Say hi\n\nto Ann", "Count to 3"]
    path.write_text('{"response": "no instruction here"}\n[1, 2]\n')
    with pytest.raises(DataError, match="no usable prompts"):
        load_instructions(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_instructions(str(tmp_path / "absent.jsonl"))


def test_evaluate_dirs_with_tasks_agreement_chat_and_html_report(tmp_path, data_dir, tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=0)
    student = make_model(len(tokenizer), layers=1, seed=1)
    dirs = {"teacher": artifact.save(teacher, tokenizer, tmp_path / "teacher"), "student": artifact.save(student, tokenizer, tmp_path / "student")}
    text = tmp_path / "heldout.txt"
    text.write_text("The time traveller spoke of the future and of the people he met there. " * 40)
    config = EvaluateConfig(text=str(text), window=32, max_windows=1, agreement_windows=1, speed_tokens=4, tasks="arc_easy", limit=2,
                            data_dir=str(data_dir), batch_size=2, max_instructions=2, max_new_tokens=4)
    results = evaluate_dirs(dirs, config, tmp_path / "out")
    assert not list((tmp_path / "out" / ".evaluate-cache").glob("teacher-logits-*"))  # the shared logits are removed
    by_name = {r["name"]: r for r in results}
    assert by_name["teacher"]["top1_agreement"] == 1.0 and by_name["teacher"]["kl_teacher_student"] == pytest.approx(0, abs=1e-6)
    assert by_name["student"]["kl_teacher_student"] > 0 and by_name["student"]["agreement_tokens"] == 32
    assert by_name["student"]["tasks"]["arc_easy"]["samples"] == 2
    assert len(by_name["student"]["answers"]) == 2 and by_name["student"]["chat_judge_nll"] > 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "arc_easy acc_norm" in html and "<script" not in html and "http" not in html
    report = (tmp_path / "out" / "report.md").read_text()
    assert "arc_easy acc_norm" in report
    assert re.search(r"\| \d+\.\d\d ± \d+\.\d\d \|", report)  # the teacher's chat NLL with its standard error
    assert (tmp_path / "out" / "pareto-speed.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_task_fails_before_any_model_is_loaded(tmp_path):
    config = EvaluateConfig(tasks=["arc_easy"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"arc_easy.*data file not found: .*arc_easy/dev.jsonl"):
        evaluate_dirs({"never-loaded": tmp_path / "absent"}, config, tmp_path / "out")


def test_config_takes_tasks_as_a_comma_list_or_a_list():
    from minigiant.config import from_dict

    assert from_dict(EvaluateConfig, {"tasks": "hellaswag, arc_easy"}, "evaluate").tasks == ["hellaswag", "arc_easy"]
    assert from_dict(EvaluateConfig, {"tasks": ["piqa"]}, "evaluate").tasks == ["piqa"]
    with pytest.raises(ConfigError, match=r"evaluate\.limit"):
        from_dict(EvaluateConfig, {"limit": 0}, "evaluate")
    with pytest.raises(ConfigError, match="named twice"):
        resolve_tasks(["arc_easy", "arc_easy"], "/nowhere")


def test_a_model_quantized_with_our_modules_scores_through_lm_eval(data_dir, tokenizer):
    """HFLM calls tie_weights(), which a packed quantized embedding cannot answer (found on the default
    run's int8/int4); the scores must come through anyway and match before and after the call."""
    from minigiant.quantize import QuantizeConfig, quantize

    model = quantize(make_model(len(tokenizer), layers=2), QuantizeConfig(bits=4, group_size=32, embedding_bits=8))
    [summary] = evaluate_tasks(model, tokenizer, resolve_tasks(["arc_easy"], data_dir), limit=2, batch_size=2).values()
    assert summary["samples"] == 2 and "acc" in summary["metrics"]
    assert "tie_weights" not in vars(model)  # the instance is left as it was
