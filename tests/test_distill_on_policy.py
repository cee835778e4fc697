"""On-policy distillation: the student answers the chat prompts itself and learns the teacher's distribution there."""

import copy
import dataclasses
import json

import pytest
import torch

from conftest import interrupt_after, make_model
from minigiant import artifact
from minigiant.config import from_dict
from minigiant.context import Context
from minigiant.distill import DistillConfig, distill
from minigiant.distill.chat import chat_examples, prompt_ids
from minigiant.distill.on_policy import OnPolicySampler, repeated_ngram_tokens
from minigiant.distill.step import StepRunner
from minigiant.errors import ConfigError

FAST = dict(block_size=64, batch_size=2, lr=3e-3, warmup_steps=2, teacher_precision="fp32", student_precision="fp32")
ROWS = [{"prompt": "Who built the machine?", "answer": "The time traveller."}, {"prompt": "Where did he go, and when did he come back?", "answer": "Far ahead."}]


def _prompt_file(tmp_path, n=4):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Tell me about the time machine number {i}."}) for i in range(n)) + "\n")
    return str(path)


def test_on_policy_batch_is_the_students_greedy_answer_with_loss_on_its_tokens_only(tokenizer):
    student, teacher = make_model(len(tokenizer), layers=2, seed=2), make_model(len(tokenizer), layers=2, seed=1)
    config = DistillConfig(on_policy_fraction=1.0, chat_fraction=1.0, on_policy_temperature=0.0, on_policy_max_new_tokens=8, **FAST)
    examples = chat_examples(tokenizer, ROWS, config.block_size)
    batch = OnPolicySampler(student, tokenizer, config, seed=0, bf16=False)(examples, index=0)
    assert batch.kind == "on_policy"
    for i, row in enumerate(ROWS):
        prompt = prompt_ids(tokenizer, row["prompt"])
        # The row's answer is the student's own greedy continuation of the prompt alone, not the teacher's answer.
        alone = student.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in alone:  # it stops at its end-of-turn, which is kept as the last trained token
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        n = int(batch.valid[i].sum())
        assert batch.ids[i, : len(prompt)].tolist() == prompt and batch.ids[i, len(prompt) : n].tolist() == alone
        assert batch.mask[i].nonzero().squeeze(1).tolist() == list(range(len(prompt) - 1, n - 1))

    # The step learns KL(teacher‖student) over exactly those positions, and no cross-entropy on the student's own tokens.
    with torch.no_grad():
        t = torch.log_softmax(teacher(batch.ids).logits, -1)[batch.mask]
        s = torch.log_softmax(student(batch.ids).logits, -1)[batch.mask]
    parts = StepRunner(student, teacher, config)(batch)
    assert "ce" not in parts and parts["kd"] == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(), rel=1e-5)


def test_on_policy_samples_are_seeded_by_the_step_and_leave_the_global_rng_alone(tokenizer):
    student = make_model(len(tokenizer), layers=2, seed=2)
    config = DistillConfig(on_policy_fraction=1.0, chat_fraction=1.0, on_policy_max_new_tokens=12, **FAST)
    examples = chat_examples(tokenizer, ROWS, config.block_size)
    sampler = OnPolicySampler(student, tokenizer, config, seed=0, bf16=False)
    rng = torch.get_rng_state()
    first, again, other = sampler(examples, 3), sampler(examples, 3), sampler(examples, 4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first.ids, again.ids) and not torch.equal(first.ids, other.ids)
    assert sampler.metrics()["batches"] == 3 and sampler.metrics()["answers"] == 6


def _kl_on_own_answers(student, teacher, tokenizer, config, examples) -> float:
    greedy = dataclasses.replace(config, on_policy_temperature=0.0)
    batch = OnPolicySampler(student, tokenizer, greedy, seed=0, bf16=False)(examples, 0)
    with torch.no_grad():
        t = torch.log_softmax(teacher(batch.ids).logits, -1)[batch.mask]
        s = torch.log_softmax(student(batch.ids).logits, -1)[batch.mask]
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_on_policy_distillation_lowers_kl_on_the_students_own_answers(tmp_path, tokenizer):
    # A confident teacher (a random one is near uniform, and so is any KL to it) and a student it can teach:
    # the teacher with noise on every decoder weight.
    teacher = make_model(len(tokenizer), layers=2, tie=False, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3)
        student = copy.deepcopy(teacher)
        torch.manual_seed(5)
        for p in student.model.layers.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.5)
    config = DistillConfig(chat_fraction=1.0, on_policy_fraction=1.0, chat_prompts=_prompt_file(tmp_path), chat_examples=4, chat_batch_size=4,
                           chat_max_new_tokens=8, on_policy_max_new_tokens=16, max_steps=30, ce_weight=0.0, cache_dir=str(tmp_path / "cache"), **FAST)
    prompts = [{"prompt": f"Tell me about the time machine number {i}.", "answer": "x"} for i in range(4)]
    examples = chat_examples(tokenizer, prompts, config.block_size)
    before = _kl_on_own_answers(student, teacher, tokenizer, config, examples)
    distill(student, config, Context(tokenizer=tokenizer, teacher=teacher))
    assert _kl_on_own_answers(student, teacher, tokenizer, config, examples) < 0.3 * before
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]["on_policy"]
    assert metrics["batches"] == 30 and metrics["answers"] == 60 and 0 < metrics["mean_answer_tokens"] <= 16


def test_resume_with_on_policy_steps_reproduces_the_uninterrupted_run(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=3, seed=1)
    config = DistillConfig(chat_fraction=0.5, on_policy_fraction=0.5, chat_prompts=_prompt_file(tmp_path), chat_examples=4, chat_batch_size=4,
                           chat_max_new_tokens=8, on_policy_max_new_tokens=8, max_steps=8, checkpoint_minutes=0.0, cache_dir=str(tmp_path / "cache"),
                           **FAST)
    straight = make_model(len(tokenizer), layers=2, seed=2)
    distill(straight, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path / "a"))
    sampled = artifact.lineage(straight)["stages"][-1]["metrics"]["on_policy"]
    assert 1 <= sampled["batches"] < 8  # a mix: some steps on the teacher's answers or on text, some on the student's

    resumed = make_model(len(tokenizer), layers=2, seed=2)
    hook = interrupt_after(teacher.model, 4)  # the answers are cached: only training runs the teacher
    work = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(resumed), config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    hook.remove()
    assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 4
    distill(resumed, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    after = artifact.lineage(resumed)["stages"][-1]["metrics"]["on_policy"]
    assert {k: v for k, v in after.items() if k != "seconds"} == {k: v for k, v in sampled.items() if k != "seconds"}  # stats survive the resume


def test_on_policy_start_keeps_the_first_part_of_the_run_on_the_teachers_answers(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    config = DistillConfig(chat_fraction=1.0, on_policy_fraction=1.0, on_policy_start=0.75, chat_prompts=_prompt_file(tmp_path), chat_examples=4,
                           chat_batch_size=4, chat_max_new_tokens=8, on_policy_max_new_tokens=8, max_steps=8, cache_dir=str(tmp_path / "cache"), **FAST)
    student = make_model(len(tokenizer), layers=2, seed=2)
    distill(student, config, Context(tokenizer=tokenizer, teacher=teacher))
    # Steps 0-5 (the first 75% of 8) train on the teacher's answers; only steps 6 and 7 sample the student.
    assert artifact.lineage(student)["stages"][-1]["metrics"]["on_policy"]["batches"] == 2


def test_a_timed_run_starts_on_policy_steps_at_a_share_of_its_time_and_keeps_them_to_the_end(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    config = DistillConfig(chat_fraction=1.0, on_policy_fraction=1.0, on_policy_start=0.5, chat_prompts=_prompt_file(tmp_path), chat_examples=4,
                           chat_batch_size=4, chat_max_new_tokens=8, on_policy_max_new_tokens=8, max_steps=100_000, minutes=0.1,
                           cache_dir=str(tmp_path / "cache"), **FAST)
    student = make_model(len(tokenizer), layers=2, seed=2)
    distill(student, config, Context(tokenizer=tokenizer, teacher=teacher))
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    first = metrics["on_policy"]["first_step"]
    # The run stops on time, not at max_steps; every step from the first on-policy one to the end samples the student.
    assert metrics["stopped_by"] == "time" and 0 < first < metrics["steps"]
    assert metrics["on_policy"]["batches"] == metrics["steps"] - first


def test_repeated_ngram_tokens_flags_every_token_of_a_repeat():
    assert repeated_ngram_tokens([1, 2, 1, 2, 1], 2) == [False, False, True, True, True]
    assert repeated_ngram_tokens([5, 6, 7, 8, 5, 6, 7, 8], 4) == [False] * 4 + [True] * 4
    assert repeated_ngram_tokens([5, 6, 7, 5, 6, 8], 3) == [False] * 6
    assert repeated_ngram_tokens([1, 1], 4) == [False, False]


def test_unlikelihood_marks_the_repeats_of_the_students_answer_and_lowers_their_probability(tokenizer):
    """A looping student (a random tiny model answers greedily in loops): the on-policy batch marks the positions
    that predict a repeated 4-gram's tokens, and steps on the unlikelihood loss alone make those tokens less likely."""
    model = make_model(len(tokenizer), layers=2, seed=3)
    config = DistillConfig(on_policy_fraction=1.0, chat_fraction=1.0, on_policy_temperature=0.0, on_policy_max_new_tokens=40,
                           unlikelihood_weight=1.0, kd_weight=1.0, **FAST)
    examples = chat_examples(tokenizer, ROWS, config.block_size)
    batch = OnPolicySampler(model, tokenizer, config, seed=0, bf16=False)(examples, 0)
    assert batch.repeats is not None and batch.repeats.any()
    assert not (batch.repeats & ~batch.mask).any()  # only answer positions
    for i, (_, prompt_length) in enumerate(examples):
        answer = batch.ids[i, prompt_length : int(batch.valid[i].sum())].tolist()
        flags = repeated_ngram_tokens(answer, 4)
        assert batch.repeats[i, prompt_length - 1 : prompt_length - 1 + len(answer)].tolist() == flags

    def repeated_probability() -> float:
        with torch.no_grad():
            p = torch.softmax(model(batch.ids).logits.float(), -1)
        where = batch.repeats.nonzero()
        return p[where[:, 0], where[:, 1], batch.ids[where[:, 0], where[:, 1] + 1]].mean().item()

    before = repeated_probability()
    ul_only = dataclasses.replace(config, kd_weight=0.0, ce_weight=0.0)  # the unlikelihood term alone
    runner = StepRunner(model, make_model(len(tokenizer), layers=2, seed=4), ul_only)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    parts = []
    for _ in range(5):
        optimizer.zero_grad()
        parts.append(runner(batch))
        optimizer.step()
    assert parts[0]["unlikelihood"] > parts[-1]["unlikelihood"] and parts[0]["loss"] == pytest.approx(parts[0]["unlikelihood"])
    assert repeated_probability() < 0.5 * before


def test_on_policy_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="set chat_fraction > 0 and kd_weight > 0"):
        from_dict(DistillConfig, {"on_policy_fraction": 0.5}, "distill")
    with pytest.raises(ConfigError, match="set chat_fraction > 0 and kd_weight > 0"):
        from_dict(DistillConfig, {"on_policy_fraction": 0.5, "chat_fraction": 0.5, "kd_weight": 0.0}, "distill")
    with pytest.raises(ConfigError, match="on_policy_fraction: must be between 0 and 1"):
        from_dict(DistillConfig, {"on_policy_fraction": 1.5, "chat_fraction": 0.5}, "distill")
    with pytest.raises(ConfigError, match="unlikelihood_weight: must be ≥ 0, and it acts on the student's own answers"):
        from_dict(DistillConfig, {"unlikelihood_weight": 1.0, "chat_fraction": 0.5}, "distill")
    with pytest.raises(ConfigError, match="on_policy_start: must be in"):
        from_dict(DistillConfig, {"on_policy_fraction": 0.5, "chat_fraction": 0.5, "on_policy_start": 1.0}, "distill")
    with pytest.raises(ConfigError, match="on_policy_temperature must be ≥ 0"):
        from_dict(DistillConfig, {"on_policy_temperature": -1.0}, "distill")


@pytest.mark.parametrize("seed", [0, 3])
def test_on_policy_steps_are_the_asked_share_of_the_chat_steps(seed):
    """The on-policy coin is independent of the chat/text coin (at seed 0 they once drew the same numbers, so
    on_policy_fraction 0.5 made every chat step on-policy)."""
    from minigiant.distill.batches import TrainingData

    data = TrainingData.__new__(TrainingData)  # kind() needs only the settings, not the data
    data.config, data.seed, data.chat, data.blocks, data.on_policy_from = DistillConfig(chat_fraction=0.5, on_policy_fraction=0.5), seed, [None], object(), 0
    kinds = [data.kind(i) for i in range(4000)]
    chat = sum(k != "text" for k in kinds)
    assert 0.45 < chat / 4000 < 0.55
    assert 0.45 < kinds.count("on_policy") / chat < 0.55
