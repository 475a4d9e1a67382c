"""Each policy's `act` on small hand-made steps, with the expected kept slots worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve.cache.thin_key import ThinKey
from kvserve.policies.base import DEFAULT_RECENT, PolicyStep
from kvserve.policies.keydiff import keydiff_scores
from kvserve.policies.registry import POLICIES, PolicyError, create_policy, describe_policies, parse_policy
from kvserve.policies.think import ThinKPolicy


def make_step(spec: dict, slots: int, *, heads: int = 1, new_tokens: int = 1, decode_sum=None, decode_max=None,
              window=None, key_norms=None, group_size: int = 1, prompt_done: bool = True, prompt_tokens: int = 100,
              positions=None) -> PolicyStep:
    """One sequence, one layer, `heads` KV heads, `slots` tokens held at positions 0..slots-1."""
    policy = create_policy(parse_policy(spec), prompt_tokens)
    shape = (1, 1, heads, slots)

    def full(values):
        return None if values is None else torch.as_tensor(values, dtype=torch.float32).expand(shape).clone()

    return PolicyStep(
        policies=[policy], lengths=torch.full(shape[:3], slots), new_tokens=torch.tensor([new_tokens]),
        decoding=torch.tensor([new_tokens == 1]), prompt_done=torch.tensor([prompt_done]),
        newest_position=torch.tensor([slots - 1 if positions is None else max(positions)]),
        held=torch.ones(shape, dtype=torch.bool),
        positions=(torch.arange(slots) if positions is None else torch.tensor(positions)).expand(shape).clone(),
        scores=torch.zeros(shape), aux=torch.zeros(shape), key_norms=full(key_norms), decode_sum=full(decode_sum),
        decode_max=full(decode_max), window=full(window), query_energy=None, group_size=group_size,
        slot=torch.zeros(shape, dtype=torch.long), key_store=torch.zeros(1, 4))


def kept(mask: torch.Tensor, head: int = 0) -> list[int]:
    return torch.nonzero(mask[0, 0, head])[:, 0].tolist()


def test_h2o_keeps_top_scores_plus_recent_window():
    # 10 slots, budget 6 with the 2 newest protected: the top 4 of slots 0..7 by accumulated score stay
    step = make_step({"name": "h2o", "budget": 6, "recent": 2}, 10, new_tokens=10, prompt_done=False,
                     window=[0.9, 0.1, 0.5, 0.05, 0.7, 0.2, 0.3, 0.01, 0.0, 0.0])
    keep = type(step.policies[0]).act(step)
    assert kept(keep) == [0, 2, 4, 6, 8, 9]
    # scores accumulate across steps: a second observation moves slot 1 above slot 6
    step.scores += torch.tensor([0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0.0])
    step.window = None
    keep = type(step.policies[0]).act(step)
    assert kept(keep) == [0, 1, 2, 4, 8, 9]


def test_h2o_decode_is_one_in_one_out_per_head():
    # budget 4 and 5 held: one token per head goes, the argmin outside the recent window
    sums = torch.tensor([[0.4, 0.05, 0.3, 0.2, 0.05], [0.1, 0.4, 0.3, 0.15, 0.05]])
    step = make_step({"name": "h2o", "budget": 4, "recent": 1}, 5, heads=2, decode_sum=sums[None, None])
    keep = type(step.policies[0]).act(step)
    assert kept(keep, 0) == [0, 2, 3, 4]
    assert kept(keep, 1) == [1, 2, 3, 4]


def test_h2o_normalize_divides_by_observing_queries():
    # a prefill chunk of 4: slot j is seen by 4 - j queries; normalised, the late slot 3 wins
    step = make_step({"name": "h2o", "budget": 2, "recent": 0, "normalize": True}, 4, new_tokens=4,
                     prompt_done=False, window=[1.6, 1.2, 0.9, 0.5])
    keep = type(step.policies[0]).act(step)
    assert step.aux[0, 0, 0].tolist() == [4, 3, 2, 1]
    assert kept(keep) == [2, 3]  # 0.45 and 0.5 beat 0.4 and 0.4


def test_corm_evicts_only_after_window_minor_steps_and_never_recent():
    spec = {"name": "corm", "window": 3, "recent": 2}
    # 6 keys at step t = 6: threshold 1/6. Slot 1 and slot 5 are always minor; slot 5 is recent
    probs = [0.5, 0.01, 0.3, 0.2, 0.3, 0.01]
    step = make_step(spec, 6, decode_max=probs)
    cls = type(step.policies[0])
    for _ in range(2):
        keep = cls.act(step)
        assert kept(keep) == [0, 1, 2, 3, 4, 5]
    keep = cls.act(step)
    assert kept(keep) == [0, 2, 3, 4, 5]
    # a key that stops being minor starts its count again
    step.aux.zero_()
    for probs_now in ([0.5, 0.01, 0.3, 0.2, 0.3, 0.01], [0.5, 0.9, 0.3, 0.2, 0.3, 0.01],
                      [0.5, 0.01, 0.3, 0.2, 0.3, 0.01], [0.5, 0.01, 0.3, 0.2, 0.3, 0.01]):
        step.decode_max = torch.tensor(probs_now).expand(1, 1, 1, 6).clone()
        keep = cls.act(step)
    assert 1 in kept(keep)
    assert step.aux[0, 0, 0, 1] == 2


def test_corm_threshold_uses_the_query_position():
    # the query at position 9 (t = 10): 0.09 is minor, 0.11 is not
    step = make_step({"name": "corm", "window": 1, "recent": 0}, 4, decode_max=[0.09, 0.11, 0.5, 0.3],
                     positions=[0, 3, 7, 9])
    assert kept(type(step.policies[0]).act(step)) == [1, 2, 3]


def test_snapkv_pools_window_votes_and_keeps_the_window():
    # 12 slots, window 3 (slots 9..11 always kept), budget 5: 2 more from max-pooled votes (kernel 3)
    votes = [0, 0, 0, 1.0, 0, 0, 0, 0.6, 0, 0, 0, 0]
    step = make_step({"name": "snapkv", "budget": 5, "window": 3, "kernel": 3, "pooling": "max"}, 12,
                     new_tokens=12, window=votes)
    keep = type(step.policies[0]).act(step)
    # pooled: slots 2, 3, 4 get 1.0; slots 6, 7, 8 get 0.6 -> the two best are two of {2, 3, 4}
    chosen = set(kept(keep)) - {9, 10, 11}
    assert len(chosen) == 2 and chosen <= {2, 3, 4}
    # avg pooling: slots 2, 3, 4 average to 0.4, 0.433, 0.367 and slots 6..8 to 0.2: slot 3 wins
    votes = [0, 0, 0.2, 1.0, 0.1, 0, 0, 0.6, 0, 0, 0, 0]
    step = make_step({"name": "snapkv", "budget": 4, "window": 3, "kernel": 3, "pooling": "avg"}, 12,
                     new_tokens=12, window=votes)
    assert kept(type(step.policies[0]).act(step)) == [3, 9, 10, 11]


def test_snapkv_acts_only_when_the_prompt_completes():
    spec = {"name": "snapkv", "budget": 4, "window": 2}
    mid_prompt = make_step(spec, 12, new_tokens=12, window=[1.0] * 12, prompt_done=False)
    assert type(mid_prompt.policies[0]).act(mid_prompt) is None
    decode = make_step(spec, 12, window=[1.0] * 12)
    assert type(decode.policies[0]).act(decode) is None


def test_streaming_llm_keeps_sinks_and_recent():
    step = make_step({"name": "streaming_llm", "budget": 6, "sinks": 2}, 12, new_tokens=12)
    assert kept(type(step.policies[0]).act(step)) == [0, 1, 8, 9, 10, 11]


def test_knorm_keeps_lowest_norm_keys():
    step = make_step({"name": "knorm", "budget": 3}, 6, new_tokens=6, key_norms=[5.0, 1.0, 3.0, 0.5, 9.0, 2.0])
    assert kept(type(step.policies[0]).act(step)) == [1, 3, 5]


def test_knorm_remembers_the_norms_of_earlier_steps():
    # norms come only for the step's new keys; older slots keep the norms stored as their scores
    step = make_step({"name": "knorm", "budget": 3}, 4, key_norms=[float("nan")] * 3 + [0.2])
    step.scores[0, 0, 0, :3] = torch.tensor([-1.0, -4.0, -0.5])
    assert kept(type(step.policies[0]).act(step)) == [0, 2, 3]


def test_tova_evicts_what_the_current_query_attends_least():
    # group of 3 query heads: the summed probabilities are averaged over it
    step = make_step({"name": "tova", "budget": 4}, 5, decode_sum=[0.9, 0.3, 0.06, 1.2, 0.54], group_size=3)
    keep = type(step.policies[0]).act(step)
    assert kept(keep) == [0, 1, 3, 4]
    assert step.scores[0, 0, 0].tolist() == pytest.approx([0.3, 0.1, 0.02, 0.4, 0.18])


@pytest.mark.parametrize("name", ["h2o", "knorm", "tova", "streaming_llm"])
def test_a_budget_never_evicts_the_prompts_tail_or_the_newest_tokens(name):
    # a 10-token prompt and 6 generated tokens, decoding; the slots the next token needs most
    # (prompt positions 8, 9; the newest 14, 15) score lowest for every scorer and sit mid-window
    spec = {"name": name, "budget": 8, "recent": 2}
    low = torch.tensor([0.0] * 8 + [-9, -9] + [0.0] * 4 + [-9, -9])
    step = make_step(spec, 16, prompt_tokens=10, decode_sum=low + 9, window=low + 9, key_norms=-low,
                     **({"positions": list(range(16))} if name == "streaming_llm" else {}))
    step.scores.copy_(low)  # h2o's accumulated score
    keep = kept(type(step.policies[0]).act(step))
    assert {8, 9, 14, 15} <= set(keep) and len(keep) == 8


def test_recent_is_at_most_half_the_budget_and_the_tail_fits_beside_it():
    policy = create_policy(parse_policy({"name": "knorm", "budget": 40}), 1000)
    assert (policy.recent(), policy.prompt_tail()) == (20, 20)
    policy = create_policy(parse_policy({"name": "knorm", "ratio": 0.5}), 1000)
    assert (policy.recent(), policy.prompt_tail()) == (DEFAULT_RECENT, DEFAULT_RECENT)
    policy = create_policy(parse_policy({"name": "h2o", "budget": 100}), 1000)  # the paper's half the budget
    assert (policy.recent(), policy.prompt_tail()) == (50, DEFAULT_RECENT)
    policy = create_policy(parse_policy({"name": "streaming_llm", "budget": 20, "sinks": 4}), 1000)
    assert policy.params.sinks + policy.recent() + policy.prompt_tail() <= 20


def test_keydiff_scores_are_minus_the_cosine_to_the_mean_unit_key():
    keys = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    held = torch.tensor([True, True, True, False])
    # the anchor: the mean of (1, 0), (0, 1), (1, 1)/sqrt(2): both coordinates (1 + 1/sqrt(2)) / 3
    expected = [-1 / math.sqrt(2), -1 / math.sqrt(2), -1.0]
    scores = keydiff_scores(keys, held)
    assert scores[:3].tolist() == pytest.approx(expected, rel=1e-6) and scores[3] == float("-inf")


def test_keydiff_evicts_the_keys_most_like_the_others_and_only_while_prefilling_by_default():
    step = make_step({"name": "keydiff", "budget": 3, "recent": 1}, 6, new_tokens=6, prompt_tokens=6)
    # keys near the x axis but for 1 (along y) and 2 (45 degrees below); 5, the prompt's last, is protected
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [1.0, 0.05], [2.0, 0.0], [1.0, 0.0]])
    step.key_store = keys
    step.slot = torch.arange(6).view(1, 1, 1, 6)
    # the two keys least like the mean direction stay beside the protected one
    assert kept(type(step.policies[0]).act(step)) == [1, 2, 5]
    decoding = make_step({"name": "keydiff", "budget": 3}, 6, prompt_tokens=2)
    assert type(decoding.policies[0]).act(decoding) is None
    assert create_policy(parse_policy({"name": "keydiff", "budget": 3}), 100).tokens_bound(50, 64) == 67


def test_registry_validates_and_describes():
    assert {"full", "h2o", "corm", "snapkv", "streaming_llm", "knorm", "tova"} <= set(POLICIES)
    with pytest.raises(PolicyError) as e:
        parse_policy({"name": "h2o", "ratio": 1.5})
    assert e.value.param == "kv_policy.ratio"
    with pytest.raises(PolicyError) as e:
        parse_policy({"name": "h2o", "budget": 10, "ratio": 0.5})
    assert "either budget or ratio" in str(e.value)
    with pytest.raises(PolicyError) as e:
        parse_policy({"name": "nope"})
    assert "h2o" in str(e.value) and e.value.param == "kv_policy.name"
    with pytest.raises(PolicyError):
        parse_policy({"name": "corm", "windw": 3})
    assert parse_policy('{"name": "snapkv", "window": 16}').window == 16
    for spec, param in [({"name": "kivi", "bits": 3}, "kv_policy.bits"),
                        ({"name": "kivi", "group_size": 32, "residual": 100}, "kv_policy.residual"),
                        ({"name": "think", "base": {"name": "kivi"}}, "kv_policy.base"),
                        ({"name": "think", "base": {"name": "h2o", "ratio": 2}}, "kv_policy.base"),
                        ({"name": "tailorkv", "budget": 60}, "kv_policy.budget"),
                        ({"name": "tailorkv", "group_size": 48}, "kv_policy.group_size")]:
        with pytest.raises(PolicyError) as e:
            parse_policy(spec)
        assert e.value.param == param, spec
    assert parse_policy({"name": "think", "base": {"name": "snapkv", "ratio": 0.25}})._base.ratio == 0.25
    described = {d["name"]: d for d in describe_policies()}
    assert described["h2o"]["defaults"]["ratio"] == 0.5
    assert "budget" in described["h2o"]["schema"]["properties"]


def test_think_scores_channels_by_query_and_key_energy_and_thins_older_tokens():
    # two sequences, one layer, one KV head of 3 query heads, 4 channels; 6 tokens each, window 2
    policies = [create_policy(parse_policy({"name": "think", "channel_ratio": 0.5, "window": 2}), 6)
                for _ in range(2)]
    shape = (2, 1, 1, 6)
    keys = torch.tensor([[3.0, 1.0, 2.0, 0.5]]).repeat(12, 1)  # key energy per channel: 9, 1, 4, 0.25
    query_energy = torch.zeros(2, 1, 3, 4)
    query_energy[0] = torch.tensor([0.01, 5.0, 1.0, 100.0])  # products: 0.09, 5, 4, 25 -> channels 1, 3
    step = PolicyStep(
        policies=policies, lengths=torch.full(shape[:3], 6), new_tokens=torch.tensor([6, 1]),
        decoding=torch.tensor([False, True]), prompt_done=torch.tensor([True, True]),
        newest_position=torch.tensor([5, 5]), held=torch.ones(shape, dtype=torch.bool),
        positions=torch.arange(6).expand(shape).clone(), scores=torch.zeros(shape), aux=torch.zeros(shape),
        key_norms=None, decode_sum=None, decode_max=None, window=None, query_energy=query_energy, group_size=3,
        slot=torch.arange(12).view(shape), key_store=keys)
    keep = ThinKPolicy.act(step)
    assert bool(keep.all())  # nothing is dropped: thinned tokens move
    assert policies[0].channels.tolist() == [[[1, 3]]]
    # the second observed no window (its last prompt chunk was one token): keys alone rank, 0 and 2
    assert policies[1].channels.tolist() == [[[0, 2]]]
    transfer = step.transfers[ThinKey(2)]
    # every token older than the window moves: positions 0..3 of both
    assert transfer.mask[:, 0, 0].tolist() == [[True] * 4 + [False] * 2] * 2
