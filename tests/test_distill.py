import copy
import json
import math

import pytest
import torch

from conftest import interrupt_after, make_model
from minigiant import artifact, load
from minigiant.context import Context
from minigiant.distill import DistillConfig, LOGIT_LOSSES, distill
from minigiant.distill.losses import logit_loss_and_grad, unlikelihood_and_grad
from minigiant.distill.trainer import lr_factor
from minigiant.errors import ConfigError, DataError, TrainingError

FAST = dict(block_size=32, batch_size=4, lr=3e-3, warmup_steps=2)


def test_logit_losses_zero_for_identical_logits_and_match_hand_computed_values():
    logits = torch.randn(10, 11)
    for name in ("kl", "reverse_kl", "symmetric_kl"):
        loss = LOGIT_LOSSES.get(name)
        assert loss(logits, logits, 2.0).abs().max() < 1e-6
        assert (loss(logits, logits + torch.randn_like(logits), 2.0) > 0).all()
    # student p = [.5, .5], teacher q = [.75, .25]:
    # KL(q‖p) = .75 ln 1.5 + .25 ln .5 = 0.130812;  KL(p‖q) = .5 ln(2/3) + .5 ln 2 = 0.143841
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert LOGIT_LOSSES.get("kl")(student, teacher, 1.0).item() == pytest.approx(0.130812, abs=1e-5)
    assert LOGIT_LOSSES.get("reverse_kl")(student, teacher, 1.0).item() == pytest.approx(0.143841, abs=1e-5)
    assert LOGIT_LOSSES.get("symmetric_kl")(student, teacher, 1.0).item() == pytest.approx(0.137327, abs=1e-5)
    # temperature 2 divides the logits, the loss is scaled by T² = 4: teacher q = softmax([ln 3 / 2, 0]) = [.634, .366]
    q = torch.softmax(teacher / 2, -1)[0]
    expected = 4 * (q[0] * torch.log(q[0] / 0.5) + q[1] * torch.log(q[1] / 0.5)).item()
    assert LOGIT_LOSSES.get("kl")(student, teacher, 2.0).item() == pytest.approx(expected, abs=1e-5)


def test_closed_form_kl_and_ce_gradient_matches_hand_values_and_autograd():
    # student p = [.5, .5], teacher q = [.75, .25], label 0: KL(q‖p) = 0.130812, CE = ln 2;
    # gradient = 1 · (p - q) + 0.1 · (p - onehot) = [-.25, .25] + [-.05, .05]
    kd, ce, grad = logit_loss_and_grad("kl", torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]), 1.0, 1.0, 0.1)
    assert kd == pytest.approx(0.130812, abs=1e-5) and ce == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.3, 0.3]]), atol=1e-6)
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3, torch.randint(0, 40, (6,))
    for loss in ("kl", "reverse_kl"):
        for temperature in (1.0, 2.0):
            for kd_weight, ce_weight in ((1.0, 0.1), (0.0, 1.0), (0.5, 0.0)):
                leaf = student.clone().requires_grad_(True)
                expected_kd = LOGIT_LOSSES.get(loss)(leaf, teacher, temperature).sum()
                expected_ce = torch.nn.functional.cross_entropy(leaf, labels, reduction="sum")
                (kd_weight * expected_kd + ce_weight * expected_ce).backward()
                kd, ce, grad = logit_loss_and_grad(loss, student, teacher, labels, temperature, kd_weight, ce_weight)
                assert kd == pytest.approx(expected_kd.item() if kd_weight else 0.0, abs=1e-4)
                assert ce == pytest.approx(expected_ce.item() if ce_weight else 0.0, abs=1e-4)
                assert torch.allclose(grad, leaf.grad, atol=1e-6), (loss, temperature, kd_weight, ce_weight)


def test_unlikelihood_matches_hand_values_and_autograd():
    # p = softmax([0, ln 3]) = [.25, .75], token 1: loss = -ln(1 - .75) = ln 4; gradient = .75/.25 · (onehot - p) = [-.75, .75]
    loss, grad = unlikelihood_and_grad(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))
    assert loss == pytest.approx(math.log(4), abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.75, 0.75]]), atol=1e-6)
    torch.manual_seed(0)
    student, tokens = torch.randn(5, 30) * 3, torch.randint(0, 30, (5,))
    leaf = student.clone().requires_grad_(True)
    expected = -torch.log1p(-torch.softmax(leaf, -1)[torch.arange(5), tokens]).sum()
    expected.backward()
    loss, grad = unlikelihood_and_grad(student, tokens)
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(grad, leaf.grad, atol=1e-5)
    assert (grad[torch.arange(5), tokens] > 0).all()  # descent lowers the repeated token's logit


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) > lr_factor(50, 100, 10) > lr_factor(90, 100, 10)


def test_kd_loss_decreases_and_student_moves_toward_teacher(tokenizer):
    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    ctx = Context(tokenizer=tokenizer, teacher=teacher)
    distill(student, DistillConfig(max_steps=40, ce_weight=0.0, **FAST), ctx)
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 4 * 32
    assert metrics["final_loss"] < 0.7 * metrics["first_loss"]
    assert not any(p.requires_grad is False for p in student.parameters())  # frozen embeddings are restored


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=3, seed=1)
    config = DistillConfig(max_steps=6, checkpoint_minutes=0.0, **FAST)
    straight = make_model(len(tokenizer), layers=2, seed=2)
    distill(straight, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path / "a"))

    # Interrupt a second run after 3 steps by making the teacher fail, then resume.
    resumed = make_model(len(tokenizer), layers=2, seed=2)
    hook = interrupt_after(teacher.model, 3)  # the decoder under the head
    work = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(resumed), config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    hook.remove()
    assert (work / "checkpoint" / "state.json").is_file()
    distill(resumed, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    calls = {"n": 0}

    def nan_after_four(module, args, output):
        calls["n"] += 1
        if calls["n"] > 4:
            output.last_hidden_state.fill_(float("nan"))
        return output

    teacher.model.register_forward_hook(nan_after_four)
    student = make_model(len(tokenizer), layers=2, seed=2)
    config = DistillConfig(max_steps=10, checkpoint_minutes=0.0, **FAST)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; stopped, the last good checkpoint \(step 4\)"):
        distill(student, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path))
    assert (tmp_path / "checkpoint" / "student.safetensors").is_file()


def test_too_short_training_text_fails(tmp_path, tokenizer):
    text = tmp_path / "short.txt"
    text.write_text("Just a few words.")
    ctx = Context(tokenizer=tokenizer, teacher=make_model(len(tokenizer), layers=2))
    with pytest.raises(DataError, match="too short"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(text=str(text), **FAST), ctx)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text found"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(text=str(empty), **FAST), ctx)


def test_hidden_and_attention_losses_match_hand_computed_values():
    from minigiant.distill.features import HIDDEN_LOSSES, attention_relation_loss

    mse, cosine = HIDDEN_LOSSES.get("mse"), HIDDEN_LOSSES.get("cosine")
    x = torch.randn(6, 8)
    assert mse(x, x).item() == 0 and cosine(x, x).item() == pytest.approx(0, abs=1e-6)
    s, t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert mse(s, t).item() == pytest.approx((2 + 2) / (1 + 8))  # Σ‖s−t‖² / Σ‖t‖²
    assert cosine(s, t).item() == pytest.approx((1 + 0) / 2)  # orthogonal, then parallel
    # One relation head of width 1, two positions: the teacher (all zeros) spreads row 2 evenly, [.5, .5];
    # the student (x = 1, 2) gives softmax([2, 4]) = [.1192, .8808]; row 1 sees only itself (KL 0).
    valid = torch.ones(1, 2, dtype=torch.bool)
    teacher, student = torch.zeros(1, 2, 1), torch.tensor([[[1.0], [2.0]]])
    row2 = 0.5 * math.log(0.5 / 0.1192029) + 0.5 * math.log(0.5 / 0.8807971)
    assert attention_relation_loss(student, teacher, 1, valid).item() == pytest.approx(row2 / 2, abs=1e-5)
    assert attention_relation_loss(teacher, teacher, 1, valid).item() == 0
    y = torch.randn(2, 5, 16)
    assert attention_relation_loss(y, y, 4, torch.ones(2, 5, dtype=torch.bool)).item() == pytest.approx(0, abs=1e-6)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def test_chunked_logit_loss_gives_the_same_loss_and_gradients_as_the_whole_batch(tokenizer):
    from minigiant.distill.step import StepRunner, text_batch

    teacher = make_model(len(tokenizer), layers=2, seed=1)
    ids = torch.randint(0, len(tokenizer), (3, 20))
    results = []
    for chunk in (0, 7):
        student = make_model(len(tokenizer), layers=2, seed=2)
        config = DistillConfig(logit_chunk=chunk, teacher_precision="fp32", student_precision="fp32", ce_weight=0.3)
        parts = StepRunner(student, teacher, config)(text_batch(ids))
        results.append((parts, _grads(student)))
    (a, grads_a), (b, grads_b) = results
    assert a["kd"] == pytest.approx(b["kd"], rel=1e-5) and a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4)


def _kl_to_teacher(student, teacher, ids):
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids).logits, -1)
        s = torch.log_softmax(student(ids).logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_kd_lowers_student_teacher_kl_on_held_out_text(tokenizer):
    from minigiant.data import sample_blocks

    teacher = make_model(len(tokenizer), layers=3, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    held_out = sample_blocks(tokenizer, "corpus:heldout", 32, 4, seed=5)
    before = _kl_to_teacher(student, teacher, held_out)
    distill(student, DistillConfig(max_steps=30, ce_weight=0.0, **FAST), Context(tokenizer=tokenizer, teacher=teacher))
    assert _kl_to_teacher(student, teacher, held_out) < 0.75 * before


def test_chat_batches_group_similar_lengths_and_cover_every_example_once_per_epoch():
    from minigiant.distill.batches import _epoch_pick

    lengths = torch.tensor([70, 250, 90, 180, 75, 240, 100, 170, 256, 85, 175, 95])  # 12 answers, 3 batches of 4
    epoch = [_epoch_pick(len(lengths), 4, index, 3, lengths) for index in range(3)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(12))
    # Sorted by length, the batches are {70,75,85,90}, {95,100,170,175}, {180,240,250,256}: padded to 90, 175, 256
    # positions, 521 per row over the epoch, against ~768 at random (each batch of 4 very likely holds a long one).
    assert sorted(int(lengths[b].max()) for b in epoch) == [90, 175, 256]
    # A pure function of (seed, index), so resuming picks the same batches; the next epoch visits them in another order.
    assert all(torch.equal(_epoch_pick(len(lengths), 4, i, 3, lengths), epoch[i]) for i in range(3))
    orders = {tuple(int(lengths[_epoch_pick(len(lengths), 4, e * 3 + i, 3, lengths)].max()) for i in range(3)) for e in range(8)}
    assert len(orders) > 1
    # A remainder that does not fill a batch waits for the next epoch, as with text blocks.
    assert all(len(_epoch_pick(len(lengths[:10]), 4, i, 0, lengths[:10])) == 4 for i in range(6))


def test_chat_batch_trains_on_answer_tokens_only(tokenizer):
    from minigiant.distill.chat import chat_batch, chat_examples, prompt_ids
    from minigiant.distill.step import StepRunner

    rows = [{"prompt": "Who wrote it?", "answer": "The time traveller."}, {"prompt": "Go on.", "answer": "He went."}]
    examples = chat_examples(tokenizer, rows, block_size=64)
    batch = chat_batch(examples, tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        p = len(prompt_ids(tokenizer, row["prompt"]))
        a = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + 1  # + end of turn
        assert batch.mask[i].nonzero().squeeze(1).tolist() == list(range(p - 1, p + a - 1))
        assert tokenizer.decode(batch.ids[i, p : p + a - 1]) == row["answer"]
        assert batch.ids[i, p + a - 1] == tokenizer.eos_token_id and batch.valid[i].sum() == p + a
    # A row keeps the end token the teacher chose (a model may have several); a cut answer gets none.
    chosen, cut = chat_examples(tokenizer, [{**rows[1], "finished": True, "stop": 7}, {**rows[1], "finished": False, "stop": None}], 64)
    assert chosen[0][-1] == 7 and chosen[0][:-1] == examples[1][0][:-1] and cut[0] == examples[1][0][:-1]

    # The step's loss is the KL over exactly those positions: changing the teacher on prompt positions does not matter.
    teacher, student = make_model(len(tokenizer), layers=2, seed=1), make_model(len(tokenizer), layers=2, seed=2)
    config = DistillConfig(teacher_precision="fp32", student_precision="fp32", ce_weight=0.0)
    with torch.no_grad():
        t = torch.log_softmax(teacher(batch.ids).logits, -1)[batch.mask]
        s = torch.log_softmax(student(batch.ids).logits, -1)[batch.mask]
    expected = (t.exp() * (t - s)).sum(-1).mean().item()
    assert StepRunner(student, teacher, config)(batch)["kd"] == pytest.approx(expected, rel=1e-5)


def test_distill_on_teacher_answers_caches_and_reuses_them(tmp_path, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Tell me about the time machine number {i}.", "context": ""}) for i in range(6)) + "\n{bad json\n")
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    config = DistillConfig(chat_fraction=1.0, chat_prompts=str(prompts), chat_examples=5, chat_batch_size=2, chat_max_new_tokens=12,
                           cache_dir=str(tmp_path / "cache"), max_steps=4, **{**FAST, "block_size": 96})
    student = make_model(len(tokenizer), layers=2, seed=2)
    distill(student, config, Context(tokenizer=tokenizer, teacher=teacher))
    cached = list((tmp_path / "cache").glob("chat-*.jsonl"))
    assert len(cached) == 1 and not cached[0].name.endswith(".partial.jsonl")
    assert len(cached[0].read_text().splitlines()) == 6  # three whole batches of 2 for the 5 usable answers
    assert artifact.lineage(student)["stages"][-1]["metrics"]["chat_examples"] == 5

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    teacher.generate = no_generation
    distill(make_model(len(tokenizer), layers=2, seed=2), config, Context(tokenizer=tokenizer, teacher=teacher))


def test_chat_examples_counts_usable_answers_and_resumes_at_a_batch(tmp_path, tokenizer, monkeypatch):
    """Self-written prompts that did not end (or have under 3 words) are replaced by new ones until
    ``chat_examples`` answers are usable; a crash mid-way resumes at the batch it stopped in."""
    from minigiant.distill import chat

    calls = []

    def fake_generate(teacher, tokenizer, prompts_ids, max_new_tokens, temperature, seed):
        calls.append((len(prompts_ids), max_new_tokens, seed))
        if max_new_tokens == 64:  # the teacher writes prompts: every third one does not end, one is too short
            return [(f"question {seed} number {i}" if i != 1 else "hi", None if i % 3 == 2 else 2) for i in range(len(prompts_ids))]
        return [("an answer", 2)] * len(prompts_ids)

    monkeypatch.setattr(chat, "_generate", fake_generate)
    config = DistillConfig(chat_examples=5, chat_batch_size=4, cache_dir=str(tmp_path))
    rows = chat.teacher_answers(make_model(len(tokenizer), layers=1), tokenizer, config)
    # A batch of 4 prompts yields 2 usable (index 1 too short, index 2 unfinished): 3 batches, cut at the 5th usable.
    assert sum(bool(r["prompt"]) for r in rows) == 5 and len(rows) == 9
    assert [seed for _, n, seed in calls if n == 64] == [0, 2, 4]
    assert all(r["stop"] == 2 and r["finished"] for r in rows if r["prompt"])
    final = next(tmp_path.glob("chat-*.jsonl"))
    assert len(final.read_text().splitlines()) == 12  # whole batches on disk

    # Resume: keep only the first batch in the partial file; the run continues from the second batch's seed.
    final.rename(final.with_name(final.name.replace(".jsonl", ".partial.jsonl")))
    partial = next(tmp_path.glob("chat-*.partial.jsonl"))
    partial.write_text("\n".join(partial.read_text().splitlines()[:4]) + "\n")
    calls.clear()
    assert chat.teacher_answers(make_model(len(tokenizer), layers=1), tokenizer, config) == rows
    assert [seed for _, n, seed in calls if n == 64] == [2, 4]

    # A teacher that never ends a prompt: bounded retries, then the one-line error of an empty chat set.
    monkeypatch.setattr(chat, "_generate", lambda *a: [("never ends here", None)] * len(a[2]))
    none = chat.teacher_answers(make_model(len(tokenizer), layers=1), tokenizer, DistillConfig(chat_examples=5, chat_batch_size=4, cache_dir=str(tmp_path / "none")))
    assert len(none) == 2 * 4 * chat.MAGPIE_TRIES  # 2 batches of 4 needed, each tried MAGPIE_TRIES times
    assert not any(r["prompt"] for r in none)
    with pytest.raises(DataError, match="no usable chat example"):
        chat.chat_examples(tokenizer, none, 64)


def test_magpie_prompts_start_from_the_template_before_the_user_turn(tokenizer):
    from minigiant.distill.chat import pre_query_ids

    assert tokenizer.decode(pre_query_ids(tokenizer)) == "<|im_start|>user\n"


def test_bad_input_fails_with_a_clear_message(tmp_path, tokenizer):
    from minigiant.config import from_dict
    from minigiant.errors import ConfigError

    teacher = make_model(len(tokenizer), layers=2)
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        from_dict(DistillConfig, {"temperature": 0}, "distill")
    other_vocab = make_model(len(tokenizer) + 64, layers=2)
    with pytest.raises(ConfigError, match=r"vocabularies differ .*kd_weight: 0"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(**FAST), Context(tokenizer=tokenizer, teacher=other_vocab))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": ""}\n{"text": "no prompt field"}\n')
    with pytest.raises(DataError, match="no usable prompt"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(chat_fraction=0.5, chat_prompts=str(empty), **FAST), Context(tokenizer=tokenizer, teacher=teacher))


def test_shared_prefix_runs_once_stays_frozen_and_matches_the_full_forward(tokenizer):
    from minigiant.distill.forward import shared_prefix_layers, split_forward_matches
    from minigiant.models.architecture import decoder_layers, keep_layers

    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = copy.deepcopy(teacher)
    keep_layers(student, [0, 1, 3])
    assert shared_prefix_layers(student, teacher) == 2
    assert split_forward_matches(teacher, 2, len(tokenizer)) and split_forward_matches(student, 2, len(tokenizer))
    before = copy.deepcopy(decoder_layers(student)[:2].state_dict())
    last_before = decoder_layers(student)[2].mlp.down_proj.weight.clone()
    distill(student, DistillConfig(max_steps=5, teacher_precision="fp32", **FAST), Context(tokenizer=tokenizer, teacher=teacher))
    assert artifact.lineage(student)["stages"][-1]["metrics"]["shared_prefix_layers"] == 2
    for k, v in decoder_layers(student)[:2].state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(decoder_layers(student)[2].mlp.down_proj.weight, last_before)


def test_train_only_mlp_keeps_attention_and_norms_and_moves_the_mlps(tokenizer):
    from minigiant.models.architecture import decoder_layers

    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    before = copy.deepcopy(student.state_dict())
    distill(student, DistillConfig(max_steps=5, train_only_mlp=True, teacher_precision="fp32", **FAST), Context(tokenizer=tokenizer, teacher=teacher))
    for i, layer in enumerate(decoder_layers(student)):
        for name, v in layer.state_dict().items():
            changed = not torch.equal(v, before[f"model.layers.{i}.{name}"])
            assert changed == name.startswith("mlp."), name
    assert all(p.requires_grad for p in student.parameters())  # unfrozen again afterwards


def test_distill_writes_the_answer_ngram_ban_into_the_students_generation_config(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    distill(student, DistillConfig(max_steps=1, answer_no_repeat_ngram_size=4, **FAST), Context(tokenizer=tokenizer, teacher=teacher))
    artifact.save(student, tokenizer, tmp_path / "student")
    reloaded, _ = load(tmp_path / "student")
    assert reloaded.generation_config.answer_no_repeat_ngram_size == 4
    assert DistillConfig(answer_no_repeat_ngram_size=4).fingerprint() == DistillConfig().fingerprint()  # a resume may change it
    with pytest.raises(ConfigError, match="answer_no_repeat_ngram_size must be ≥ 0"):
        DistillConfig(answer_no_repeat_ngram_size=-1).validate("distill")


def test_gradient_accumulation_equals_the_larger_batch(tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    fp32 = dict(teacher_precision="fp32", student_precision="fp32", block_size=32, lr=3e-3, warmup_steps=2, max_steps=3)
    one, two = make_model(len(tokenizer), layers=2, seed=2), make_model(len(tokenizer), layers=2, seed=2)
    distill(one, DistillConfig(batch_size=4, grad_accum=1, **fp32), Context(tokenizer=tokenizer, teacher=teacher))
    distill(two, DistillConfig(batch_size=2, grad_accum=2, **fp32), Context(tokenizer=tokenizer, teacher=teacher))
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_ctrl_c_saves_a_checkpoint_after_the_current_step(tmp_path, tokenizer):
    import os
    import signal

    teacher = make_model(len(tokenizer), layers=2, seed=1)
    calls = {"n": 0}

    def interrupt_at_third_step(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    teacher.model.register_forward_hook(interrupt_at_third_step)
    config = DistillConfig(max_steps=10, checkpoint_minutes=60.0, **FAST)
    with pytest.raises(KeyboardInterrupt):
        distill(make_model(len(tokenizer), layers=2, seed=2), config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path))
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3


def test_eval_curve_and_feature_losses_with_a_narrower_student(tokenizer):
    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = make_model(len(tokenizer), layers=2, hidden=32, seed=2)
    config = DistillConfig(max_steps=12, hidden_weight=1.0, attention_weight=1.0, eval_every=6, eval_text="corpus:heldout", eval_windows=1, **FAST)
    distill(student, config, Context(tokenizer=tokenizer, teacher=teacher))
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    assert [point[1] for point in metrics["eval_curve"]] == [0, 6, 12]
    assert all(math.isfinite(point[2]) and point[0] >= 0 for point in metrics["eval_curve"])  # [minutes, step, ppl]
    assert metrics["final_loss"] < metrics["first_loss"]


def test_top_k_cache_with_k_equal_to_vocab_trains_like_the_online_teacher(tmp_path, tokenizer):
    from minigiant.errors import ConfigError

    teacher = make_model(len(tokenizer), layers=2, seed=1)
    fp32 = dict(teacher_precision="fp32", student_precision="fp32", max_steps=4, **FAST)
    online = make_model(len(tokenizer), layers=2, seed=2)
    distill(online, DistillConfig(**fp32), Context(tokenizer=tokenizer, teacher=teacher))
    cached = DistillConfig(logit_cache=str(tmp_path / "logits"), logit_cache_k=len(tokenizer), **fp32)
    for attempt in ("fill", "read"):
        student = make_model(len(tokenizer), layers=2, seed=2)
        distill(student, cached, Context(tokenizer=tokenizer, teacher=teacher if attempt == "fill" else _failing_copy(teacher)))
        for a, b in zip(online.parameters(), student.parameters()):
            assert torch.allclose(a, b, atol=1e-5), attempt
    with pytest.raises(ConfigError, match="built for another setup .*block_size"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(**{**cached.__dict__, "block_size": 16}), Context(tokenizer=tokenizer, teacher=teacher))


def _failing_copy(teacher):
    """The same weights, but running its decoder fails: a run that reads the cache must not need the teacher."""
    clone = copy.deepcopy(teacher)

    def fail(*args, **kwargs):
        raise AssertionError("the teacher ran although its logits were cached")

    clone.model.forward = fail
    return clone


def test_top_k_cache_spreads_the_tail_mass_evenly(tmp_path):
    from minigiant.distill.logit_cache import LogitCache

    cache = LogitCache(tmp_path, {"teacher": "t"}, blocks=1, block_size=1, k=2, vocab=5)
    logits = torch.log(torch.tensor([[[0.5, 0.1, 0.2, 0.1, 0.1]]]))
    cache.store(torch.tensor([0]), logits)
    dense = cache.dense(torch.tensor([0]), torch.tensor([0]), block_size=1).exp()[0]
    # top 2 kept exactly (.5, .2); the other .3 spread over 3 tokens
    assert torch.allclose(dense, torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1]), atol=1e-6)


def test_teacher_fingerprint_follows_the_weights_not_where_they_were_loaded_from(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from minigiant.distill.chat import teacher_fingerprint

    model = make_model(len(tokenizer))
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert a.config._name_or_path != b.config._name_or_path
    assert teacher_fingerprint(a) == teacher_fingerprint(b) == teacher_fingerprint(model)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert teacher_fingerprint(b) != teacher_fingerprint(a)


def test_block_local_losses_are_local_and_teacher_forcing_feeds_the_teachers_stream():
    from minigiant.distill.local import LocalHealer

    teacher = make_model(50, layers=3, seed=1)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 50, (2, 12))
    valid = torch.ones_like(ids, dtype=torch.bool)
    for inputs in ("student", "teacher"):  # identical models: every layer already reproduces the teacher
        healer = LocalHealer(student, teacher, inputs)
        assert max(l.item() for l in healer.layer_losses(ids, valid)) < 1e-10
        healer.remove()
    with torch.no_grad():  # perturb only layer 0
        for p in student.model.layers[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    forced = LocalHealer(student, teacher, "teacher")
    losses = [l.item() for l in forced.layer_losses(ids, valid)]
    forced.remove()
    assert losses[0] > 1e-3 and max(losses[1:]) < 1e-10  # later layers get the teacher's clean inputs
    own = LocalHealer(student, teacher, "student")
    losses = own.layer_losses(ids, valid)
    own.remove()
    assert losses[1].item() > 1e-4  # layer 1 sees layer 0's error in the student's own stream ...
    losses[1].backward()
    assert all(p.grad is None for p in student.model.layers[0].parameters())  # ... but its loss trains layer 1 only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.layers[1].parameters())


def test_block_local_healing_lowers_the_hidden_error_then_global_kd_runs(tokenizer):
    from minigiant.data import sample_blocks
    from minigiant.distill.batches import TrainingData
    from minigiant.distill.local import LocalHealer, heal_blocks
    from minigiant.prune import PruneConfig, prune

    teacher = make_model(len(tokenizer), layers=3, seed=1)
    pruned = copy.deepcopy(teacher)
    ctx = Context(tokenizer=tokenizer, teacher=teacher)
    prune(pruned, PruneConfig(structure="width", width_parts="mlp", target=0.6, multiple_of=1, calibration_blocks=4, block_size=32, batch_size=2, reconstruct="none"), ctx)
    ids = sample_blocks(tokenizer, "corpus:heldout", 32, 8, 0)
    valid = torch.ones_like(ids, dtype=torch.bool)

    def hidden_error(student):
        healer = LocalHealer(student, teacher)
        with torch.no_grad():
            error = sum(l.item() for l in healer.layer_losses(ids, valid))
        healer.remove()
        return error

    config = DistillConfig(max_steps=80, local_fraction=0.5, **{**FAST, "lr": 3e-4})
    student = copy.deepcopy(pruned)
    params = [p for n, p in student.named_parameters() if "embed" not in n]
    local = heal_blocks(student, teacher, TrainingData(tokenizer, teacher, config, 0), config, params, 40, None, 0, False, first_index=0)
    assert local["steps"] == 40 and len(local["layer_loss"]) == 3
    assert hidden_error(student) < 0.8 * hidden_error(pruned)

    student = copy.deepcopy(pruned)
    distill(student, DistillConfig(max_steps=8, local_fraction=0.5, **FAST), ctx)
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    assert metrics["local"]["steps"] == 4 and metrics["steps"] == 4  # half the steps each
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(ConfigError, match="hidden size"):
        LocalHealer(make_model(len(tokenizer), layers=3, hidden=32), teacher)
    with pytest.raises(ConfigError, match="local_fraction"):
        DistillConfig(local_fraction=1.0).validate("distill")


def test_a_sparse_student_keeps_its_zeros_while_it_heals(tokenizer):
    from minigiant.models.architecture import decoder_layers
    from minigiant.prune import PruneConfig, prune

    teacher = make_model(len(tokenizer), layers=3, seed=1)
    pruned = make_model(len(tokenizer), layers=2, seed=2)
    prune(pruned, PruneConfig(structure="unstructured", sparsity_method="magnitude", sparsity=0.5), Context(tokenizer=tokenizer))

    def zeros(model):
        return {name: p.detach() == 0 for name, p in decoder_layers(model).named_parameters() if p.dim() == 2}

    from minigiant.data import sample_blocks

    held_out = sample_blocks(tokenizer, "corpus:heldout", 32, 4, seed=5)
    before = zeros(pruned)
    kept, filled = copy.deepcopy(pruned), copy.deepcopy(pruned)
    ctx = Context(tokenizer=tokenizer, teacher=teacher)
    distill(kept, DistillConfig(max_steps=20, ce_weight=0.0, **FAST), ctx)  # keep_sparsity: null -> on, from the prune in the lineage
    metrics = artifact.lineage(kept)["stages"][-1]["metrics"]
    assert _kl_to_teacher(kept, teacher, held_out) < 0.75 * _kl_to_teacher(pruned, teacher, held_out)
    after = zeros(kept)
    assert all(torch.equal(before[n], after[n]) for n in before)  # exactly the same zeros, no new ones
    assert metrics["sparsity"]["masked_matrices"] == len(before) == 2 * 7
    assert metrics["sparsity"]["masked_zero_fraction_start"] == metrics["sparsity"]["masked_zero_fraction_end"] == pytest.approx(0.5, abs=0.01)
    moved = [n for n, p in decoder_layers(kept).named_parameters() if p.dim() == 2 and not torch.equal(p, dict(decoder_layers(pruned).named_parameters())[n])]
    assert len(moved) == len(before)  # the nonzero weights did train
    distill(filled, DistillConfig(max_steps=2, keep_sparsity=False, **FAST), ctx)
    assert sum(int(m.sum()) for m in zeros(filled).values()) < 0.01 * sum(int(m.sum()) for m in before.values())
    assert not any(p._backward_hooks for p in kept.parameters())  # the gradient masks are removed afterwards


def test_a_run_behind_its_plan_trains_for_what_is_left_but_never_under_a_quarter_of_its_budget(tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)

    def budget(cap, max_steps=1000):
        student = make_model(len(tokenizer), layers=2, seed=2)
        distill(student, DistillConfig(max_steps=max_steps, minutes=0.04, **FAST), Context(tokenizer=tokenizer, teacher=teacher, minutes_cap=cap))
        stage = artifact.lineage(student)["stages"][-1]
        assert stage["settings"]["minutes"] == 0.04  # recorded as asked
        return stage["metrics"]

    behind = budget(0.02)
    assert behind["budget_minutes"] == 0.02 and behind["stopped_by"] == "time"
    assert budget(-3.0)["budget_minutes"] == 0.01  # past the plan already: a quarter of 0.04
    assert budget(5.0, max_steps=2)["budget_minutes"] == 0.04  # a cap above the budget changes nothing


def test_a_longer_timed_run_scales_the_step_cap_with_its_budget(tokenizer):
    # minutes is far from binding, so the cap decides: 3 planned steps, run --minutes doubling the budgets → 6.
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    distill(student, DistillConfig(max_steps=3, minutes=60.0, **FAST), Context(tokenizer=tokenizer, teacher=teacher, time_scale=2.0))
    stage = artifact.lineage(student)["stages"][-1]
    assert stage["metrics"]["steps"] == 6 and stage["metrics"]["stopped_by"] == "max_steps"
    assert stage["settings"]["max_steps"] == 3 and stage["settings"]["minutes"] == 60.0  # recorded as asked, like the time budget
    untimed = make_model(len(tokenizer), layers=2, seed=2)  # a run without a time budget keeps its cap
    distill(untimed, DistillConfig(max_steps=3, **FAST), Context(tokenizer=tokenizer, teacher=teacher, time_scale=2.0))
    assert artifact.lineage(untimed)["stages"][-1]["metrics"]["steps"] == 3
