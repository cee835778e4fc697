"""Batched generation (minigiant.generate): greedy equals transformers' generate, a batch equals its prompts
run alone, and the nucleus sampler keeps exactly the tokens top-p keeps."""

from __future__ import annotations

import pytest
import torch

from minigiant.generate import generate, nucleus_sample, penalize_repeats, repeated_ngram_bans, sample_continuations

from conftest import make_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def test_greedy_batch_equals_transformers_generate_and_each_prompt_alone(tokenizer):
    model = make_model(len(tokenizer), layers=2, tie=False)  # untied: greedy does not just repeat the last token
    # Two stop tokens the prompts' greedy answers reach after a few tokens, so that some rows leave the batch
    # early, and the returned stop is the one each row produced (a model may have several end tokens).
    alone = [sample_continuations(model, [p], 0, set(), 12, 0.0, 0)[0][0] for p in PROMPTS]
    stops = {alone[0][5], alone[2][3]}
    batch = sample_continuations(model, PROMPTS, pad=0, stops=stops, max_new_tokens=12, temperature=0.0, seed=0)
    for prompt, (ids, stop) in zip(PROMPTS, batch):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=12, do_sample=False,
                             eos_token_id=sorted(stops), pad_token_id=0, temperature=None, top_p=None, top_k=None)[0, len(prompt):].tolist()
        end = next((i for i, t in enumerate(out) if t in stops), None)
        assert ids == (out if end is None else out[:end]) and stop == (None if end is None else out[end])
        assert sample_continuations(model, [prompt], 0, stops, 12, 0.0, 0) == [(ids, stop)]
    assert batch[0][1] == alone[0][len(batch[0][0])] and len(batch[0][0]) <= 5
    assert batch[2][1] is not None and len(batch[2][0]) <= 3
    assert all(len(ids) == 12 for ids, stop in batch if stop is None)  # unfinished rows ran to the limit


def test_penalize_repeats_matches_a_hand_computed_row():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    # seen and positive: 2 / 1.25 = 1.6; seen and negative: -1 * 1.25 = -1.25; unseen tokens unchanged
    assert torch.equal(penalize_repeats(logits, seen, 1.25), torch.tensor([[1.6, -1.25, 0.5, -3.0]]))


def test_repetition_penalty_equals_transformers_generate_and_changes_the_answer(tokenizer):
    """The penalty covers the prompt and every token generated so far, batched rows leaving the batch included,
    exactly as transformers' ``repetition_penalty`` does; a greedy tiny model that loops stops looping."""
    model = make_model(len(tokenizer), layers=2, tie=False)
    plain = sample_continuations(model, PROMPTS, 0, set(), 12, 0.0, 0)
    alone = [sample_continuations(model, [p], 0, set(), 12, 0.0, 0, repetition_penalty=1.5)[0][0] for p in PROMPTS]
    stops = {alone[1][4]}
    batch = sample_continuations(model, PROMPTS, 0, stops, 12, 0.0, 0, repetition_penalty=1.5)
    for prompt, (ids, stop) in zip(PROMPTS, batch):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=12, do_sample=False,
                             eos_token_id=sorted(stops), pad_token_id=0, temperature=None, top_p=None, top_k=None,
                             repetition_penalty=1.5)[0, len(prompt):].tolist()
        end = next((i for i, t in enumerate(out) if t in stops), None)
        assert ids == (out if end is None else out[:end]) and stop == (None if end is None else out[end])
    assert batch[1][1] is not None  # a row left the batch early, and the others kept their own seen tokens
    assert [ids for ids, _ in plain] != alone
    assert sum(len(set(ids)) for ids in alone) > sum(len(set(ids)) for ids, _ in plain)  # fewer repeats


def test_repeated_ngram_bans_by_hand():
    assert repeated_ngram_bans([1, 2, 3, 1, 2], 3) == [3]  # "1 2 3" again
    assert sorted(repeated_ngram_bans([1, 2, 1, 3, 1], 2)) == [2, 3]  # after 1 came 2 and 3
    assert sorted(repeated_ngram_bans([4, 5, 4], 1)) == [4, 4, 5]  # n = 1: every token already there
    assert repeated_ngram_bans([1, 2], 4) == [] and repeated_ngram_bans([1, 2, 3], 4) == []


def _ngrams(ids, n):
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_answer_ngram_ban_stops_loops_and_ignores_the_prompt(tokenizer):
    """No answer repeats one of its own bigrams (and each is a greedy answer under that ban: the first token
    by logit that completes no earlier bigram), while the prompt's bigrams stay allowed."""
    model = make_model(len(tokenizer), layers=2, tie=False)
    loops = [ids for ids, _ in sample_continuations(model, PROMPTS, 0, set(), 16, 0.0, 0)]
    assert any(len(set(_ngrams(ids, 2))) < len(_ngrams(ids, 2)) for ids in loops)  # the tiny model loops
    banned = sample_continuations(model, PROMPTS, 0, set(), 16, 0.0, 0, answer_no_repeat_ngram_size=2)
    for prompt, (ids, _) in zip(PROMPTS, banned):
        assert len(set(_ngrams(ids, 2))) == len(_ngrams(ids, 2)) and len(ids) == 16
        for i, token in enumerate(ids):  # greedy among the allowed tokens
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids[:i]])).logits[0, -1]
            order = [t for t in logits.argsort(descending=True).tolist() if i == 0 or (ids[i - 1], t) not in _ngrams(ids[:i], 2)]
            assert token == order[0]
    # the prompt's n-grams stay allowed: continue a looping answer from the middle, its first bigram is one the
    # prompt already has, and the ban lets it through
    prompt = PROMPTS[0] + loops[0][:8]
    plain = sample_continuations(model, [prompt], 0, set(), 2, 0.0, 0)[0][0]
    assert tuple(plain) in _ngrams(prompt, 2)
    assert sample_continuations(model, [prompt], 0, set(), 2, 0.0, 0, answer_no_repeat_ngram_size=2)[0][0] == plain


def test_generate_decodes_as_the_generation_config_asks(tokenizer):
    from minigiant.generate import pad_id, prompt_ids

    model = make_model(len(tokenizer), layers=2, tie=False)
    ids = prompt_ids(tokenizer, "Tell me a story.")[0].tolist()
    plain = generate(model, tokenizer, "Tell me a story.", max_new_tokens=12)
    model.generation_config.answer_no_repeat_ngram_size = 2
    model.generation_config.repetition_penalty = 1.3
    tuned = generate(model, tokenizer, "Tell me a story.", max_new_tokens=12)
    expected = sample_continuations(model, [ids], pad_id(tokenizer), set(), 12, 0.0, 0, repetition_penalty=1.3, answer_no_repeat_ngram_size=2)[0][0]
    assert tuned == tokenizer.decode(expected, skip_special_tokens=True) and tuned != plain


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tokenizer):
    model = make_model(len(tokenizer), layers=2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = sample_continuations(model, PROMPTS, 0, set(), 10, 1.0, seed=7)
    assert torch.rand(1) == expected_next
    assert sample_continuations(model, PROMPTS, 0, set(), 10, 1.0, seed=7) == first
    assert sample_continuations(model, PROMPTS, 0, set(), 10, 1.0, seed=8) != first
    assert all(len(ids) == 10 and stop is None for ids, stop in first)


def test_nucleus_keeps_exactly_the_top_p_tokens_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: the mass above each token is 0, 0.5, 0.8, 0.95, so top-p 0.9 keeps
    # the first three, which are then drawn in proportion 0.5 : 0.3 : 0.15.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(20_000, 1)
    tokens = nucleus_sample(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[3] == 0
    assert counts[:3].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], abs=0.015)
    # temperature 0.5 squares the probabilities before top-p: 0.25, 0.09, 0.0225, 0.0025 (sum 0.365) → the mass
    # above the second token is 0.685 > 0.6, so only the first two stay.
    tokens = nucleus_sample(logits, 0.5, 0.6, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0}  # 0.25 / 0.365 = 0.685 ≥ 0.6: the first token alone reaches top-p
    tokens = nucleus_sample(logits, 0.5, 0.7, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}


def test_nucleus_wider_than_its_candidates_sorts_the_whole_vocabulary():
    # 8000 nearly equal tokens, in decreasing order: the 0.95 nucleus is the first ~7600, more than the 4096
    # candidates looked at before a full sort.
    vocab = 8000
    logits = (-torch.arange(vocab, dtype=torch.float32) * 1e-5).repeat(4000, 1)
    probs = torch.softmax(logits[0], -1)
    kept = int(((probs.cumsum(0) - probs) < 0.95).sum())
    assert 4096 < kept < vocab
    tokens = nucleus_sample(logits, 1.0, 0.95, torch.Generator().manual_seed(0))
    assert tokens.max() < kept and tokens.max() > 4096  # drawn beyond the candidates, never outside the nucleus


def test_a_constraint_that_leaves_only_banned_tokens_keeps_them(tokenizer):
    """``allowed_tokens`` narrows every step to two tokens; with a unigram ban both are banned from the third step
    on, and the row then keeps the allowed tokens instead of drawing from an all -inf row."""
    from minigiant.generate import decode_steps

    model = make_model(len(tokenizer), layers=2)
    for temperature in (0.0, 1.0):
        steps = list(decode_steps(model, [PROMPTS[0]], 0, set(), 6, temperature, 0, answer_no_repeat_ngram_size=1,
                                  allowed_tokens=lambda prompt, tokens: [40, 41]))
        tokens = [token for (_, token), in steps]
        assert len(tokens) == 6 and set(tokens) <= {40, 41} and sorted(tokens[:2]) == [40, 41]
