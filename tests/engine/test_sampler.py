"""The sampler on hand-made logits: each setting does what it says, row by row in one batch."""

import torch

from lmcli.engine.sampler import sample
from lmcli.engine.sampling_params import SamplingParams
from lmcli.engine.sequence import Sequence

V = 8


def seq(params, tokens=(1, 2), outputs=()):
    s = Sequence(list(tokens) + list(outputs), params, num_prompt_tokens=len(tokens))
    return s


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    row = [0.0, 1.0, 5.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=1.0, seed=1)),
            seq(SamplingParams(top_k=1, temperature=1.5))]
    tokens, _ = sample(logits(row, row, row), seqs, [[], [], []])
    assert tokens[0] == 2 and tokens[2] == 2


def test_repetition_presence_and_frequency_penalties():
    row = [0.0, 0.0, 3.0, 2.9, -1.0, 0.0, 0.0, 0.0]
    rep = seq(SamplingParams(temperature=0, repetition_penalty=1.5), tokens=(2,))  # 3.0 / 1.5 = 2.0 < 2.9
    pres = seq(SamplingParams(temperature=0, presence_penalty=0.5), tokens=(9 % V,), outputs=(2,))
    freq = seq(SamplingParams(temperature=0, frequency_penalty=0.04), outputs=(2, 2, 2))  # 3.0 - 0.12 < 2.9
    weak = seq(SamplingParams(temperature=0, frequency_penalty=0.01), outputs=(2, 2, 2))  # 3.0 - 0.03 > 2.9
    prompt_only = seq(SamplingParams(temperature=0, presence_penalty=2.0), tokens=(2,))  # prompt tokens: no penalty
    tokens, _ = sample(logits(*[row] * 5), [rep, pres, freq, weak, prompt_only], [[]] * 5)
    assert tokens == [3, 3, 3, 2, 2]
    neg = seq(SamplingParams(temperature=0, repetition_penalty=2.0), tokens=(4,))  # negative logits get lower
    assert sample(logits([-1.0, -1.5, -3, -3, -0.9, -3, -3, -3]), [neg], [[]])[0] == [0]


def test_min_tokens_masks_stop_tokens_until_reached():
    row = [0.0, 0.0, 9.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    early = seq(SamplingParams(temperature=0, min_tokens=2), outputs=(5,))
    done = seq(SamplingParams(temperature=0, min_tokens=2), outputs=(5, 5))
    tokens, _ = sample(logits(row, row), [early, done], [[2], [2]])
    assert tokens == [3, 2]


def test_logit_bias_bans_and_forces_tokens_row_by_row():
    row = [0.0, 1.0, 5.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    ban = seq(SamplingParams(temperature=0, logit_bias=((2, -100.0),)))  # 5 - 100: token 3 is the argmax now
    force = seq(SamplingParams(temperature=0, logit_bias=((6, 100.0),)))
    nudge = seq(SamplingParams(temperature=0, logit_bias=((3, 2.5),)))  # 2 + 2.5 < 5: still token 2
    forced_sampling = seq(SamplingParams(seed=3, logit_bias=((7, 100.0),)))
    free = seq(SamplingParams(temperature=0))
    tokens, lps = sample(logits(*[row] * 5), [ban, force, nudge, forced_sampling, free], [[]] * 5)
    assert tokens == [3, 6, 2, 7, 2]
    banned_draws = draws(SamplingParams(seed=0, logit_bias=((0, -100.0), (1, -100.0))), [0.0] * 3 + [-50.0] * 5)
    assert banned_draws == {2}


def draws(params, row, n=300):
    s = seq(params)
    return {sample(logits(row), [s], [[]])[0][0] for _ in range(n)}


def test_top_k_top_p_and_min_p_keep_only_the_allowed_tokens():
    row = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 1e-9, 1e-9, 1e-9])).tolist()
    assert draws(SamplingParams(seed=0), row) >= {0, 1, 2, 3}
    assert draws(SamplingParams(seed=0, top_k=2), row) == {0, 1}
    assert draws(SamplingParams(seed=0, top_p=0.6), row) == {0, 1}  # 0.4 < 0.6 <= 0.7
    assert draws(SamplingParams(seed=0, top_p=0.1), row) == {0}
    assert draws(SamplingParams(seed=0, min_p=0.3), row) == {0, 1, 2}  # p >= 0.12
    assert draws(SamplingParams(seed=0, temperature=0.05), row) == {0}  # nearly greedy


def test_seeded_rows_do_not_depend_on_the_batch():
    row = torch.zeros(V).tolist()  # uniform: every draw is up to the noise
    alone = seq(SamplingParams(seed=42))
    first = [sample(logits(row), [alone], [[]])[0][0] for _ in range(20)]
    together, other = seq(SamplingParams(seed=42)), seq(SamplingParams(seed=7))
    second = [sample(logits(row, row), [other, together], [[], []])[0][1] for _ in range(20)]
    assert first == second and len(set(first)) > 3


def test_logprobs_are_the_model_distribution_with_top_alternatives():
    row = [0.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    s = seq(SamplingParams(temperature=0, logprobs=2))
    none = seq(SamplingParams(temperature=0))
    tokens, lps = sample(logits(row, row), [s, none], [[], []])
    expected = torch.tensor(row).log_softmax(-1)
    assert tokens[0] == 2 and lps[1] is None
    assert abs(lps[0].logprob - expected[2].item()) < 1e-6
    assert [t for t, _ in lps[0].top] == [2, 3]
    assert abs(lps[0].top[1][1] - expected[3].item()) < 1e-6


def test_grammar_masks_limit_their_rows_and_leave_logprobs_the_models():
    row = [0.0, 1.0, 5.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    seqs = [seq(SamplingParams(temperature=0, logprobs=2)), seq(SamplingParams(temperature=0, logprobs=2)),
            seq(SamplingParams(temperature=1.0, seed=3))]
    bitmask = torch.tensor([[0b1010], [0b10000000]], dtype=torch.int32)  # row 1: tokens 1 and 3; row 2: token 7
    tokens, lps = sample(logits(row, row, row), seqs, [[], [], []], (torch.tensor([1, 2]), bitmask))
    assert tokens == [2, 3, 7]  # the free row takes its argmax; the greedy masked row its best allowed token
    raw = logits(row).log_softmax(-1)[0]
    assert lps[1].logprob == raw[3].item() and [t for t, _ in lps[1].top] == [2, 3]  # the model's, finite


def test_the_sampler_runs_where_the_logits_are():
    """On LMCLI_TEST_DEVICE (a GPU on the GPU machine; here the CPU): every setting at once in one batch gives the
    CPU's tokens (seeded sampled rows included) and logprobs, twice over."""
    import os

    device = os.environ.get("LMCLI_TEST_DEVICE", "cpu")
    torch.manual_seed(0)
    rows = torch.randn(6, 300) * 3

    def batch():
        return [seq(SamplingParams(temperature=0, logprobs=3)),
                seq(SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias=((7, 5.0),)), tokens=(5, 9)),
                seq(SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5, logprobs=0),
                    outputs=(11, 11)),
                seq(SamplingParams(temperature=0, min_tokens=2), outputs=(3,)),
                seq(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=42, logprobs=2)),
                seq(SamplingParams(temperature=1.0, seed=7))]

    stops = [[], [], [], [int(rows[3].argmax())], [], []]
    cpu_tokens, cpu_lp = sample(rows.clone(), batch(), stops)
    tokens, lp = sample(rows.clone().to(device), batch(), stops)
    again, _ = sample(rows.clone().to(device), batch(), stops)
    assert tokens == cpu_tokens == again  # seeded rows too: their noise comes from the CPU generator
    assert tokens[3] != stops[3][0]
    assert [x is None for x in lp] == [x is None for x in cpu_lp] == [False, True, False, True, False, True]
    for ours, theirs in zip(lp[0:3:2], cpu_lp[0:3:2]):  # greedy rows: the same token, so the same logprobs
        assert abs(ours.logprob - theirs.logprob) < 1e-4
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
    assert len(lp[0].top) == 3 and lp[2].top == [] and len(lp[4].top) == 2
    raw = rows[4].log_softmax(-1)
    assert abs(lp[4].logprob - raw[tokens[4]].item()) < 1e-4  # the model's own logprob of the drawn token
