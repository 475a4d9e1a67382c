"""Each policy's `act` on small hand-made steps, with the expected kept slots worked out by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kvserve.cache.thin_key import ThinKey
from kvserve.kernels.window_queries import window_queries
from kvserve.policies.base import DEFAULT_RECENT, PolicyStep, adaptive_budgets, keep_top, protected_recent
from kvserve.policies.corm import minor_for_all
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
        decode_max=full(decode_max), window=full(window), queries=None, group_size=group_size,
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


def test_h2o_window_counts_only_the_chunks_last_queries():
    # a prefill chunk of 4 observed in its last 2 queries (positions 2, 3): slot j is seen by 2 of them
    # for j <= 2 and by 1 for j = 3; the normalised scores 0.4, 0.3, 0.45, 0.5 keep slots 2 and 3
    step = make_step({"name": "h2o", "budget": 2, "recent": 0, "normalize": True, "window": 2}, 4, new_tokens=4,
                     prompt_done=False, window=[0.8, 0.6, 0.9, 0.5])
    assert step.policies[0].prefill_window(4, False) == 2
    keep = type(step.policies[0]).act(step)
    assert step.aux[0, 0, 0].tolist() == [2, 2, 2, 1]
    assert kept(keep) == [2, 3]


def test_h2o_kernel_ranks_by_the_score_pooled_over_neighbours():
    # 8 slots, budget 3: alone, the best three are 0, 4 and 7; pooled over 3 neighbours, slot 3's and
    # slot 5's 0.9 (from slot 4) beat slot 0's and slot 7's 0.5, keeping the neighbourhood of slot 4
    scores = [0.5, 0.1, 0.0, 0.2, 0.9, 0.1, 0.0, 0.5]
    alone = make_step({"name": "h2o", "budget": 3, "recent": 0}, 8, decode_sum=scores)
    assert kept(type(alone.policies[0]).act(alone)) == [0, 4, 7]
    pooled = make_step({"name": "h2o", "budget": 3, "recent": 0, "kernel": 3}, 8, decode_sum=scores)
    assert kept(type(pooled.policies[0]).act(pooled)) == [3, 4, 5]
    with pytest.raises(PolicyError, match="odd"):
        parse_policy({"name": "h2o", "kernel": 4})


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


def test_corm_minor_for_all_queries_on_hand_computed_probabilities():
    # one KV head of 2 query heads, 1 channel, scale 1; keys 0, -ln 4, ln 2 at positions 0, 1, 2
    keys = torch.tensor([[0.0], [-math.log(4)], [math.log(2)]])
    key_positions, held = torch.arange(3), torch.ones(3, dtype=torch.bool)
    # the query at position 2 (threshold 1/3): head 0 (q = 1) gives 1/3.25, 0.25/3.25, 2/3.25;
    # head 1 (q = -1) gives 1/5.5, 4/5.5, 0.5/5.5; the group max is below 1/3 for key 0 alone
    last = torch.tensor([[1.0], [-1.0]])
    # the query at position 1 (threshold 1/2) sees keys 0 and 1: head 0 gives key 0 0.8, not minor
    earlier = torch.tensor([[1.0], [1.0]])
    queries = torch.stack([earlier, last])  # [W = 2, G = 2, D = 1]
    positions = torch.tensor([1, 2])
    both = minor_for_all(queries, positions, torch.tensor([True, True]), keys, key_positions, held, 1.0)
    assert both.tolist() == [False, False, False]  # key 2 is not even visible to the earlier query
    last_only = minor_for_all(queries, positions, torch.tensor([False, True]), keys, key_positions, held, 1.0)
    assert last_only.tolist() == [True, False, False]
    # a key the head no longer holds takes no share of the softmax: without key 1, head 0 gives key 0
    # 1/3 exactly, which is not below 1/3
    without = minor_for_all(queries, positions, torch.tensor([False, True]), keys, key_positions,
                            torch.tensor([True, False, True]), 1.0)
    assert without.tolist() == [False, False, False]


def test_corm_prefill_extends_the_count_over_whole_chunks_and_restarts_it_past_the_window():
    # 8 slots, window 4 observed queries; recent 2. A chunk of 4 whose 4 queries (positions 4..7)
    # all find slots 0 and 1 minor extends their count; a chunk of 8 observed only in its last 4
    # restarts it at 4
    spec = {"name": "corm", "window": 4, "recent": 2}
    for new_tokens, before, after in ((4, 3.0, 7.0), (8, 3.0, 4.0)):
        step = make_step(spec, 8, new_tokens=new_tokens, prompt_done=False)
        step.aux.fill_(before)
        # keys: slot 0 and 1 far from every query; the rest close (each query's softmax is dominated by them)
        step.key_store = torch.tensor([[-4.0], [-4.0]] + [[2.0]] * 6)
        step.slot = torch.arange(8).view(1, 1, 1, 8)
        step.queries = torch.ones(1, 1, 4, 1, 1)
        step.query_count = torch.tensor([4])
        keep = type(step.policies[0]).act(step)
        assert step.aux[0, 0, 0, :2].tolist() == [after, after] and step.aux[0, 0, 0, 2:].tolist() == [0.0] * 6
        assert kept(keep) == [2, 3, 4, 5, 6, 7]  # both counts reach the window


def test_corm_kernel_keeps_the_neighbours_of_a_major_key_by_position():
    # a decode query at position 9 (threshold 1/10) finds only the key at position 3 major; window 1
    # evicts every other key outside `recent` (position 9) at once, unless kernel 3 spares position
    # 3's neighbours 2 and 4, found by position although the slots are shuffled
    positions = [5, 3, 9, 0, 2, 7, 4, 1, 8, 6]
    decode_max = [0.9 if p == 3 else 0.01 for p in positions]
    for kernel, kept_positions in ((1, [3, 9]), (3, [2, 3, 4, 9])):
        step = make_step({"name": "corm", "window": 1, "recent": 1, "kernel": kernel}, 10,
                         decode_max=decode_max, positions=positions)
        keep = type(step.policies[0]).act(step)
        assert sorted(positions[i] for i in kept(keep)) == kept_positions


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


@pytest.mark.parametrize("spec", [{"name": "snapkv", "budget": 4, "window": 2}, {"name": "tova", "budget": 4},
                                  {"name": "keydiff", "budget": 4}])
def test_a_policy_that_says_it_does_not_act_changes_nothing(spec):
    # the runner skips a sequence whose policy does not act in a step: act must agree on every case
    # (steps with observations and stored scores that would make it evict if it did act)
    cases = [(decoding, done) for decoding in (True, False) for done in (True, False) if done or not decoding]
    assert not all(create_policy(parse_policy(spec), 12).acts(*case) for case in cases)
    for decoding, prompt_done in cases:
        step = make_step(spec, 12, new_tokens=1 if decoding else 12, prompt_done=prompt_done, prompt_tokens=12,
                         window=[0.1 * i for i in range(12)], decode_sum=[0.05 * i for i in range(12)],
                         key_norms=[float(i) for i in range(12)])
        step.scores.uniform_(0.2, 0.4)
        step.aux.uniform_(0.2, 0.4)
        step.key_store = torch.randn(12, 4)
        step.slot = torch.arange(12).view(1, 1, 1, 12)
        before = step.scores.clone(), step.aux.clone()
        keep = type(step.policies[0]).act(step)
        if step.policies[0].acts(decoding, prompt_done):
            continue
        assert keep is None or bool(keep.all()), (decoding, prompt_done)
        assert torch.equal(step.scores, before[0]) and torch.equal(step.aux, before[1]), (decoding, prompt_done)


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


def test_tova_averages_over_the_layers_heads_by_position_and_waits_for_the_prompt():
    # two KV heads whose slots hold positions in different orders; by layer, each position's score is
    # the mean of the two heads' (a group of 1): position 0 (0.5 + 0.1) / 2 = 0.3, 1: 0.25, 2: 0.35, 3: 0.25
    window = torch.tensor([[0.5, 0.3, 0.6, 0.2], [0.1, 0.1, 0.2, 0.3]])  # by slot
    positions = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3]])
    spec = {"name": "tova", "budget": 2, "recent": 0}
    step = make_step(spec, 4, heads=2, new_tokens=4, window=window[None, None], prompt_tokens=4)
    step.positions = positions[None, None].clone()
    keep = type(step.policies[0]).act(step)
    expected = torch.tensor([[0.3, 0.25, 0.35, 0.25], [0.3, 0.35, 0.25, 0.25]])
    assert torch.allclose(step.scores[0, 0], expected, rtol=1e-6)  # float32 means of two numbers
    assert kept(keep, 0) == [0, 2] and kept(keep, 1) == [0, 1]  # positions 0 and 2 in both heads
    # by group, each head keeps its own best
    step = make_step({**spec, "heads": "group"}, 4, heads=2, new_tokens=4, window=window[None, None], prompt_tokens=4)
    keep = type(step.policies[0]).act(step)
    assert kept(keep, 0) == [0, 2] and kept(keep, 1) == [2, 3]
    # before the prompt is in, nothing is observed or evicted unless chunked
    policy = create_policy(parse_policy(spec), 100)
    assert policy.prefill_window(64, False) == 0 and policy.prefill_window(64, True) == 1
    assert policy.tokens_bound(10, 64) == 110
    step = make_step(spec, 4, new_tokens=4, prompt_done=False, window=[0.5, 0.1, 0.1, 0.3])
    assert type(step.policies[0]).act(step) is None
    step = make_step({**spec, "chunked": True}, 4, new_tokens=4, prompt_done=False, window=[0.5, 0.1, 0.1, 0.3])
    assert kept(type(step.policies[0]).act(step)) == [0, 3]
    with pytest.raises(PolicyError, match="heads: group"):
        parse_policy({"name": "tova", "adaptive": True})


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


def test_window_queries_right_aligns_each_rows_last_queries():
    # two prefill rows of 3 and 4 tokens (one head, one channel holding the token's index)
    q = torch.arange(7, dtype=torch.float32).view(7, 1, 1)
    start_loc = torch.tensor([0, 3, 7])
    observed = window_queries(q, start_loc, torch.tensor([2, 5]))  # the second is capped at its 4 tokens
    assert observed.shape == (2, 4, 1, 1) and observed.dtype == torch.float32
    assert observed[..., 0, 0].tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert window_queries(q, start_loc, torch.tensor([0, 1]))[..., 0, 0].tolist() == [[0], [6]]


def test_think_scores_channels_by_query_and_key_energy_and_thins_older_tokens():
    # two sequences, one layer, one KV head of 3 query heads, 4 channels; 6 tokens each, window 2
    policies = [create_policy(parse_policy({"name": "think", "channel_ratio": 0.5, "window": 2}), 6)
                for _ in range(2)]
    shape = (2, 1, 1, 6)
    keys = torch.tensor([[3.0, 1.0, 2.0, 0.5]]).repeat(12, 1)  # key energy per channel: 9, 1, 4, 0.25
    # the first observed two queries, q**2 of 0.02, 10, 2, 200 and 0: energies 0.01, 5, 1, 100
    # (products 0.09, 5, 4, 25 -> channels 1, 3); the second observed none
    queries = torch.zeros(2, 1, 2, 3, 4)
    queries[0, 0, 1] = torch.tensor([0.02, 10.0, 2.0, 200.0]).sqrt()
    step = PolicyStep(
        policies=policies, lengths=torch.full(shape[:3], 6), new_tokens=torch.tensor([6, 1]),
        decoding=torch.tensor([False, True]), prompt_done=torch.tensor([True, True]),
        newest_position=torch.tensor([5, 5]), held=torch.ones(shape, dtype=torch.bool),
        positions=torch.arange(6).expand(shape).clone(), scores=torch.zeros(shape), aux=torch.zeros(shape),
        key_norms=None, decode_sum=None, decode_max=None, window=None, queries=queries, group_size=3,
        slot=torch.arange(12).view(shape), key_store=keys, query_count=torch.tensor([2, 0]))
    keep = ThinKPolicy.act(step)
    assert bool(keep.all())  # nothing is dropped: thinned tokens move
    assert policies[0].channels.tolist() == [[[1, 3]]]
    # the second observed no window (its last prompt chunk was one token): keys alone rank, 0 and 2
    assert policies[1].channels.tolist() == [[[0, 2]]]
    transfer = step.transfers[ThinKey(2)]
    # every token older than the window moves: positions 0..3 of both
    assert transfer.mask[:, 0, 0].tolist() == [[True] * 4 + [False] * 2] * 2


# ---- head-adaptive budgets (AdaKV): a layer's budget shared among its heads by score ----

CONCENTRATED = [0.70, 0.20, 0.04, 0.02, 0.01, 0.01, 0.01, 0.01]  # one token draws most of the head's attention
DIFFUSE = [0.25, 0.15, 0.15, 0.12, 0.10, 0.09, 0.08, 0.05]


def shares(scores, budget: int, floor: int, protected=None) -> list[int]:
    """adaptive_budgets of one layer of fully held heads."""
    scores = torch.tensor(scores)[None, None]
    held = torch.ones_like(scores, dtype=torch.bool)
    protected = torch.zeros_like(held) if protected is None else torch.tensor(protected)[None, None]
    return adaptive_budgets(scores, held, protected, torch.tensor(budget), torch.tensor(floor))[0, 0].tolist()


def stack(*steps: PolicyStep) -> PolicyStep:
    """One step of the sequences of `steps` (one each), rows in that order."""
    first = steps[0]
    rows = {f.name: torch.cat([getattr(s, f.name) for s in steps]) for f in dataclasses.fields(first)
            if isinstance(getattr(first, f.name), torch.Tensor) and f.name != "key_store"}
    return dataclasses.replace(first, policies=[p for s in steps for p in s.policies], **rows)


def test_adaptive_budgets_give_a_concentrated_head_fewer_tokens_and_a_diffuse_head_more():
    # budget 4 per head: 8 for the layer. Floor 1: each head's best first (0.70 | 0.25); the other 6 go to
    # the best of the rest of both heads: 0.20 of the concentrated head, 0.15, 0.15, 0.12, 0.10, 0.09 of the other
    assert shares([CONCENTRATED, DIFFUSE], 4, 1) == [2, 6]
    # floor 3: each head's best three (0.70, 0.20, 0.04 | 0.25, 0.15, 0.15), then 0.12 and 0.10, both diffuse
    assert shares([CONCENTRATED, DIFFUSE], 4, 3) == [3, 5]
    # a floor at the budget leaves nothing to share
    assert shares([CONCENTRATED, DIFFUSE], 4, 4) == [4, 4]
    # equal scores: the lower head first (each head's first slot is its floor; then head 0's slots 1 and 2)
    assert shares([[0.5] * 4, [0.5] * 4], 2, 1) == [3, 1]


def test_adaptive_budgets_count_protected_slots_inside_their_heads_budget():
    # slot 7 of the concentrated head (0.01) is protected: it fills that head's floor of 1, so the head's
    # 0.70 competes with the rest: 0.70, 0.20 | 0.15, 0.15, 0.12, 0.10 after the diffuse head's floor, 0.25
    protected = [[False] * 7 + [True], [False] * 8]
    assert shares([CONCENTRATED, DIFFUSE], 4, 1, protected) == [3, 5]
    scores = torch.tensor([CONCENTRATED, DIFFUSE])[None, None]
    held = torch.ones_like(scores, dtype=torch.bool)
    keep = keep_top(scores, held, torch.tensor(protected)[None, None], torch.tensor([3, 5]))
    assert kept(keep, 0) == [0, 1, 7] and kept(keep, 1) == [0, 1, 2, 3, 4]


def test_adaptive_budgets_sum_to_the_layers_budget_and_respect_floor_protection_and_holdings():
    g = torch.Generator().manual_seed(0)
    n, layers, heads, slots = 3, 4, 4, 24
    scores = torch.rand(n, layers, heads, slots, generator=g) ** 4
    lengths = torch.randint(4, slots + 1, (n, layers, heads), generator=g)
    held = torch.arange(slots) < lengths[..., None]
    protected = held & (torch.arange(slots) >= lengths[..., None] - 2)  # each head's last two
    budget = torch.tensor([6, 10, 30])[:, None, None]  # the last row's layers hold less than their budget
    floor = torch.tensor([2, 3, 6])[:, None, None]
    got = adaptive_budgets(scores, held, protected, budget, floor)
    assert torch.equal(got.sum(-1), torch.minimum(heads * budget[..., 0], lengths.sum(-1)))
    assert bool((got >= torch.minimum(lengths, torch.maximum(floor, torch.tensor(2)))).all())
    assert bool((got <= lengths).all())
    assert not bool((got == got[..., :1]).all())  # the heads do not all get the same
    keep = keep_top(scores, held, protected, got)
    assert torch.equal(keep.sum(-1), got) and bool(keep[protected].all())


def test_tova_adaptive_keeps_fewer_tokens_in_a_concentrated_head_and_its_protected_ones():
    spec = {"name": "tova", "budget": 4, "recent": 0, "adaptive": True, "heads": "group"}  # floor: ceil(0.2 x 4) = 1
    step = make_step(spec, 8, heads=2, new_tokens=8, window=torch.tensor([CONCENTRATED, DIFFUSE])[None, None])
    keep = type(step.policies[0]).act(step)
    assert kept(keep, 0) == [0, 1] and kept(keep, 1) == [0, 1, 2, 3, 4, 5]
    # recent 1: the newest slot (7) is protected in both heads and counts in their share
    step = make_step({**spec, "recent": 1}, 8, heads=2, new_tokens=8,
                     window=torch.tensor([CONCENTRATED, DIFFUSE])[None, None])
    keep = type(step.policies[0]).act(step)
    assert kept(keep, 0) == [0, 1, 7] and kept(keep, 1) == [0, 1, 2, 3, 7]


def test_snapkv_adaptive_shares_each_rows_layer_budget_beside_a_uniform_row():
    # 10 slots, window 2 (slots 8, 9 protected), budget 5: 10 per layer, 2 x 2 protected, 6 to share (kernel 1:
    # no pooling). Votes: 0.9 of the first head, then 0.3, 0.2, 0.15, 0.12, 0.1 of the second
    votes = torch.tensor([[0.9, 0.05, 0.02, 0.01, 0.01, 0.005, 0.005, 0.0, 0.5, 0.5],
                          [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.0, 0.5, 0.5]])[None, None]
    spec = {"name": "snapkv", "budget": 5, "window": 2, "kernel": 1}
    steps = [make_step({**spec, "adaptive": adaptive}, 10, heads=2, new_tokens=10, prompt_tokens=10, window=votes)
             for adaptive in (True, False)]
    keep = type(steps[0].policies[0]).act(stack(*steps))
    assert torch.nonzero(keep[0, 0, 0])[:, 0].tolist() == [0, 8, 9]
    assert torch.nonzero(keep[0, 0, 1])[:, 0].tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert keep[1].sum(-1).tolist() == [[5, 5]]  # the uniform row: the budget in every head


def test_knorm_adaptive_ranks_each_heads_norms_against_its_own_spread():
    # the second head's norms are the first's times 10: standardised, both heads look alike and share
    # evenly (raw, the first head's -1..-6 would all beat the second's -10..-60: 5 and 1)
    norms = torch.tensor([[1.0, 2, 3, 4, 5, 6], [10.0, 20, 30, 40, 50, 60]])[None, None]
    spec = {"name": "knorm", "budget": 3, "recent": 0, "adaptive": True}
    step = make_step(spec, 6, heads=2, new_tokens=6, key_norms=norms)
    keep = type(step.policies[0]).act(step)
    assert kept(keep, 0) == [0, 1, 2] and kept(keep, 1) == [0, 1, 2]
    # one key far below a head's other norms (z 2.24, the rest -0.45) against norms spread evenly
    # (z 1.46, 0.88, 0.29, -0.29, ...): after the floors (slot 0 of each), 0.88, 0.29, -0.29 and one -0.45
    norms = torch.tensor([[1.0, 5, 5, 5, 5, 5], [1.0, 2, 3, 4, 5, 6]])[None, None]
    step = make_step(spec, 6, heads=2, new_tokens=6, key_norms=norms)
    keep = type(step.policies[0]).act(step)
    assert keep[0, 0].sum(-1).tolist() == [2, 4] and kept(keep, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["h2o", "knorm", "tova"])
def test_adaptive_false_keeps_exactly_the_uniform_budget(name):
    values = torch.rand(1, 1, 3, 20, generator=torch.Generator().manual_seed(1))
    kept_by = {}
    for adaptive in (None, False, True):
        spec = {"name": name, "budget": 7, "recent": 2, **({} if adaptive is None else {"adaptive": adaptive}),
                **({"heads": "group", "chunked": True} if name == "tova" else {})}
        step = make_step(spec, 20, heads=3, new_tokens=20, prompt_done=False, prompt_tokens=40, window=values,
                         key_norms=values)
        kept_by[adaptive] = type(step.policies[0]).act(step)
    uniform = keep_top(step.scores, step.held, protected_recent(step), torch.tensor(7))
    assert torch.equal(kept_by[None], uniform) and torch.equal(kept_by[False], uniform)
    assert kept_by[False].sum(-1).tolist() == [[[7, 7, 7]]]
    assert int(kept_by[True].sum()) == 21 and kept_by[True].sum(-1).tolist() != [[[7, 7, 7]]]


def test_adaptive_is_validated_and_bounds_a_head_by_its_layer():
    with pytest.raises(PolicyError) as e:
        parse_policy({"name": "streaming_llm", "adaptive": True})  # it keeps by position: nothing to rank
    assert e.value.param == "kv_policy.adaptive" and "position" in str(e.value)
    with pytest.raises(PolicyError) as e:
        parse_policy({"name": "knorm", "adaptive": True, "adaptive_floor": 0})
    assert e.value.param == "kv_policy.adaptive_floor"
    with pytest.raises(PolicyError):
        parse_policy({"name": "think", "base": {"name": "streaming_llm", "adaptive": True}})
    assert parse_policy({"name": "think", "base": {"name": "snapkv", "adaptive": True}})._base.adaptive
    assert create_policy(parse_policy({"name": "h2o", "budget": 15, "adaptive": True}), 100).head_floor() == 3
    policy = create_policy(parse_policy({"name": "knorm", "budget": 10, "adaptive": True, "adaptive_floor": 0.25}),
                           1000)
    assert policy.head_floor() == 3 and policy.most_kept(kv_heads=4) == 4 * 10 - 3 * 3
    assert policy.tokens_bound(50, 64) == 1050  # the KV heads unknown: only the sequence's length bounds a head
    assert create_policy(parse_policy({"name": "knorm", "budget": 10}), 1000).tokens_bound(50, 64) == 74
    keydiff = create_policy(parse_policy({"name": "keydiff", "budget": 3, "adaptive": True}), 100)
    assert keydiff.tokens_bound(50, 64) == 150
