"""Perplexity: the hand computation, strided windows, the worst windows, the reference ratio, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_dynorm.data import strided_windows
from hf_dynorm.evaluation import agreement, compare, perplexity
from tiny import VOCAB, hand_mean_nll, tiny_model


def ids(n, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_perplexity_is_exp_mean_nll_by_hand():
    model, tokens = tiny_model("llama"), ids(64)
    result = perplexity(model, tokens, window=32, progress=False)
    with torch.no_grad():
        nll = []
        for start in (0, 32):
            window = tokens[start:start + 32][None]
            logits = model(window).logits[0]
            losses = F.cross_entropy(logits[:-1], window[0, 1:], reduction="none")
            nll.append(losses if start == 0 else torch.cat([losses[-1:] * 0, losses])[1:])
    # windows [0, 32) and [32, 64): tokens 1..31 then 33..63 are scored; token 32 starts a window, unseen context
    by_hand = torch.cat(nll)
    assert result.tokens == by_hand.numel() == 62
    assert result.mean_nll == pytest.approx(float(by_hand.double().mean()), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


@pytest.mark.parametrize("n, length, stride", [(100, 32, 31), (100, 32, 8), (97, 16, 5), (32, 32, 32)])
def test_overlapping_strided_windows_score_every_token_exactly_once(n, length, stride):
    scored = []
    for w in strided_windows(n, length, stride):
        assert w.end - w.start <= length and w.start < w.scored_from <= w.end
        scored += range(w.scored_from, w.end)
    assert scored == list(range(1, n))


def test_disjoint_windows_score_every_token_but_window_starts_once():
    windows = strided_windows(100, 32, 32)
    scored = [t for w in windows for t in range(w.scored_from, w.end)]
    assert scored == [t for t in range(1, 100) if t not in (32, 64, 96)]


def test_worst_window_report_names_the_planted_failure():
    model, tokens = tiny_model("llama"), ids(32 * 6)
    poisoned = 4  # window index whose every logit is replaced by noise favouring a wrong token
    tokens[poisoned * 32:(poisoned + 1) * 32] = 7

    def plant(module, args, kwargs, output):
        for row, window in enumerate(kwargs["input_ids"]):
            if (window == 7).all():
                output.logits[row] = -50.0
                output.logits[row, :, 8] = 50.0
        return output

    model.register_forward_hook(plant, with_kwargs=True)
    result = perplexity(model, tokens, window=32, batch_size=2, progress=False)
    assert result.worst_windows[0]["index"] == poisoned
    assert result.window_nll_percentiles["p100"] == pytest.approx(result.worst_windows[0]["mean_nll"])


def test_reference_ratio_is_the_ratio_of_hand_computed_perplexities():
    model, reference, tokens = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2), ids(192)
    results = compare(model, reference, tokens, window=64, progress=False)
    expected = math.exp(hand_mean_nll(model, tokens, 64) - hand_mean_nll(reference, tokens, 64))
    assert expected != pytest.approx(1.0, abs=1e-3)  # two different models
    assert results["perplexity_ratio"] == pytest.approx(expected, rel=1e-6)


def test_bad_evaluation_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids(10), window=32, progress=False)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        perplexity(model, ids(500), window=128, progress=False)
    with pytest.raises(ValueError, match="the text is empty"):
        perplexity(model, [""], tokenizer=lambda text, **k: {"input_ids": []}, window=32, progress=False)


def test_agreement_of_a_copy_is_perfect_and_of_another_model_matches_a_hand_count():
    model, tokens = tiny_model("llama", seed=1), ids(96)
    copy = tiny_model("llama", seed=1)
    same = agreement(model, copy, tokens, window=32, prompts=2, prompt_tokens=8, new_tokens=5)
    assert (same["top1"], same["greedy"]) == (1.0, 1.0) and same["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["worst_window_kl"] == pytest.approx(0.0, abs=1e-9)
    other = tiny_model("llama", seed=2)
    found = agreement(model, other, tokens, window=32, prompts=2, prompt_tokens=8, new_tokens=5)
    # by hand: every window's scored positions, float64, and greedy decoding one argmax at a time
    equal, kl, positions, window_kls = 0, 0.0, 0, []
    with torch.no_grad():
        for start in range(0, 96, 32):
            window = tokens[start:start + 32][None]
            ours = model(window).logits[0, :-1].double().log_softmax(-1)
            theirs = other(window).logits[0, :-1].double().log_softmax(-1)
            equal += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            window_kls.append(float((theirs.exp() * (theirs - ours)).sum(-1).mean()))
            kl += window_kls[-1] * 31
            positions += 31

        def decode(m, prompt):
            sequence = prompt.clone()
            for _ in range(5):
                sequence = torch.cat([sequence, m(sequence[None]).logits[0, -1].argmax().view(1)])
            return sequence[len(prompt):]

        prompts = [tokens[0:8], tokens[88:96]]
        greedy = sum(int((decode(model, p) == decode(other, p)).sum()) for p in prompts) / 10
    assert found["top1"] == pytest.approx(equal / positions) and found["top1"] < 1.0
    assert found["kl"] == pytest.approx(kl / positions, rel=1e-4) and found["kl"] > 0
    assert found["worst_window_kl"] == pytest.approx(max(window_kls), rel=1e-4)
    assert found["worst_window_kl"] > found["kl"]
    assert found["greedy"] == pytest.approx(greedy)
