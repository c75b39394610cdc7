import pytest
import torch

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.sampler import Sampler, SamplingBatch
from nimblelm.sampling_params import SamplingParams

V = 8


def batch(params, token_ids=None, generators=None, n_prompt=None):
    token_ids = token_ids or [[0] for _ in params]
    n_prompt = n_prompt or [len(t) for t in token_ids]
    generators = generators or [None] * len(params)
    return SamplingBatch.build(params, token_ids, n_prompt, generators, V, torch.device("cpu"))


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0, 0.0, 2.5, 1.5]])


def draw_many(params, n=400, seed=0):
    torch.manual_seed(seed)
    logits = LOGITS.repeat(n, 1)
    return Sampler()(logits, batch([params] * n)).token_ids


def test_greedy_is_argmax():
    out = Sampler()(LOGITS.repeat(2, 1), batch([SamplingParams(temperature=0)] * 2))
    assert out.token_ids == [1, 1]


def test_top_k_keeps_only_the_k_best():
    assert set(draw_many(SamplingParams(temperature=1.0, top_k=2))) == {1, 6}
    assert set(draw_many(SamplingParams(temperature=1.0, top_k=1))) == {1}


def test_top_p_keeps_the_smallest_set_covering_p():
    probs = LOGITS.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    # top_p just above the top-1 mass needs exactly the two best tokens.
    p = probs[order[0]].item() + 0.01
    assert set(draw_many(SamplingParams(temperature=1.0, top_p=p))) == set(order[:2])


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = LOGITS.softmax(-1)[0]
    kept = {i for i in range(V) if probs[i] >= 0.5 * probs.max()}
    assert set(draw_many(SamplingParams(temperature=1.0, min_p=0.5))) == kept


def test_sampling_follows_the_distribution():
    tokens = torch.tensor(draw_many(SamplingParams(temperature=1.0), n=4000))
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert torch.allclose(freq, LOGITS.softmax(-1)[0], atol=0.03)


def test_seeded_rows_do_not_depend_on_the_batch():
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler()(LOGITS, batch([p], generators=[gen(42)])).token_ids[0]]
    g = gen(42)
    alone += [Sampler()(LOGITS, batch([p], generators=[g])).token_ids[0] for _ in range(20)]
    # Same seed inside a batch with unseeded neighbours, in another row.
    g2 = gen(42)
    mixed = []
    other = SamplingParams(temperature=1.0)
    first = Sampler()(LOGITS.repeat(3, 1), batch([other, p, other], generators=[None, gen(42), None]))
    mixed.append(first.token_ids[1])
    for _ in range(20):
        out = Sampler()(LOGITS.repeat(3, 1), batch([other, p, other], generators=[None, g2, None]))
        mixed.append(out.token_ids[1])
    assert alone == mixed
    assert len(set(alone)) > 1  # it really samples


def test_repetition_penalty_as_in_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5, -1.0, 0.0, 2.9, 1.5]])
    seen = [1, 2]
    b = batch([params], token_ids=[seen], n_prompt=[2])
    ours = b.penalties.apply(logits)
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([seen]), logits.clone())
    assert torch.allclose(ours, ref)
    assert Sampler()(logits, b).token_ids == [6]  # 3.0 / 1.5 = 2.0 < 2.9


def test_presence_and_frequency_penalties_count_output_only():
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    logits = torch.zeros(1, V)
    # prompt [3], output [1, 1, 2]
    b = batch([params], token_ids=[[3, 1, 1, 2]], n_prompt=[1])
    out = b.penalties.apply(logits)[0]
    assert out[1].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[2].item() == pytest.approx(-(0.5 + 0.25))
    assert out[3].item() == 0.0


def test_logprobs_of_the_raw_distribution_with_ranks():
    params = SamplingParams(temperature=0, logprobs=3)
    out = Sampler()(LOGITS, batch([params]))
    chosen, rank, top_ids, top_lps = out.logprobs[0]
    ref = LOGITS.log_softmax(-1)[0]
    assert rank == 1 and chosen == pytest.approx(ref[1].item())
    assert top_ids == [1, 6, 2]
    assert top_lps == pytest.approx(ref[[1, 6, 2]].tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"n": 0},
        {"max_tokens": -1},
        {"top_k": -2},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"logprobs": -1},
        {"stop": [""]},
    ],
)
def test_invalid_values_raise_one_typed_error(kwargs):
    with pytest.raises(InvalidRequestError, match="invalid sampling parameter"):
        SamplingParams(**kwargs)
