"""Hand-worked cases for the in-LLM methods, each written for a mutant that survived the model-based tests.

The model-based tests (test_in_llm_selection.py) check kept rows against eager attention on
random tiny models; these cover what random models never produce: one-sample batches, exact
ties (identical tokens), budgets at the edge of a plan, stages without a planned share, tiny
token counts. Every expected value below is worked out by hand in the comment beside it.
"""

import pytest
import torch

from vtc.methods import Budget, VTCError, get
from vtc.methods.dart import duplication_picks
from vtc.methods.llm_base import Stage


class HandContext:
    """One sample: image rows 0..n-1 then text rows; the attention row, keys and states are given by the test.

    ``final_norm`` is the identity, so DART's states are ``hidden`` as given. Requests are recorded.
    """

    def __init__(self, n_image: int, n_text: int = 4, scores=None, hidden=None, keys=None):
        length = n_image + n_text
        self.image_rows, self.text_rows, self.last_row = [torch.arange(n_image)], [torch.arange(n_image, length)], length - 1
        hidden = torch.zeros(length, 8) if hidden is None else hidden
        self.hidden = self.previous = self.embeds = hidden[None]
        self.scores = torch.zeros(length) if scores is None else scores
        self._keys = torch.ones(length, 8) if keys is None else keys
        self.requests = []

    def positions(self, b):
        return torch.arange(self.hidden.shape[1])

    def attention(self, layer, states, queries, rope=True, keys=None):
        self.requests.append(("attention", layer, rope))
        row = self.scores if keys is None else self.scores[keys[0]]
        return [row.expand(len(queries[0]), -1)]

    def keys(self, layer, states, rope=True):
        self.requests.append(("keys", layer, rope))
        return self._keys[None]

    def final_norm(self, states):
        return states


def kept(method, stage: Stage, ctx, index: int = 0) -> list[int]:
    choice = method.choose(index, [stage], ctx)[0]
    assert choice.keep.dtype == torch.long  # row indices (a float tensor cannot index the rows)
    return choice.keep.tolist()


# ----------------------------------------------------------------------------- PyramidDrop


def test_pyramiddrop_on_a_single_sample_keeps_the_top_of_its_stage_layers_own_attention():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0])  # 8 image + 4 text rows
    ctx = HandContext(8, scores=scores)
    assert kept(get("pyramiddrop", layers=(2,)), Stage(2, 3), ctx) == [1, 3, 5]  # scores 0.9, 0.8, 0.7
    assert ctx.requests == [("attention", 2, True)]  # the pruning layer itself, with RoPE


def test_pyramiddrop_meets_a_target_within_half_a_token_of_the_least_plan_and_refuses_below():
    method = get("pyramiddrop", layers=(1, 2, 3))
    # fewest tokens: one per stage; 63 image tokens over 4 layers -> (63 + 1 + 1 + 1) / 4 = 16.5: target 16 is met
    assert [s.keep for s in method.plan(63, 4, Budget.parse(16))] == [1, 1, 1]
    # 62 tokens -> (62 + 3) / 4 = 16.25, more than half a token above 15: refused, naming the 16 it can reach
    with pytest.raises(VTCError, match="below the 16 that"):
        method.plan(62, 4, Budget.parse(15))


def test_pyramiddrop_picks_the_closest_average_even_when_it_is_above_the_target():
    # 16 tokens, stages before layers 1 and 3 of 4, counts (int(16 l), int(16 l^2)): l = 3/4 gives (12, 9), average
    # (16 + 12 + 12 + 9) / 4 = 12.25; any l < 3/4 gives at most (11, 8): 11.5. Target 12: 12.25 is closer.
    assert [s.keep for s in get("pyramiddrop", layers=(1, 3)).plan(16, 4, Budget.parse(12))] == [12, 9]


# ----------------------------------------------------------------------------- FEATHER


def test_feather_least_plan_keeps_one_token_per_stage_without_a_grid():
    # 63 tokens are not a square: no grid, so the fewest is one token per stage: (63 + 1 + 1 + 1) / 4 = 16.5, target 16 met
    assert [s.keep for s in get("feather", layers=(1, 2)).plan(63, 4, Budget.parse(16))] == [1, 1]


def test_feather_first_stage_on_a_non_square_count_is_the_plain_top():
    scores = torch.arange(63.0).flip(0)  # token j scores 62 - j
    assert kept(get("feather"), Stage(1, 5), HandContext(63, scores=torch.cat([scores, torch.zeros(4)]))) == [0, 1, 2, 3, 4]


def test_feather_budget_equal_to_the_grid_keeps_only_the_grid():
    # 64 tokens on 8 x 8, stride 3: rows and columns 0, 3, 6 -> 9 grid tokens; the best token (1) is not on the grid
    scores = torch.zeros(68)
    scores[1] = 1.0
    grid = [0, 3, 6, 24, 27, 30, 48, 51, 54]
    assert kept(get("feather"), Stage(1, 9), HandContext(64, scores=scores)) == grid


def test_feather_later_stage_without_a_share_keeps_its_planned_count():
    # vtc speed replays fixed counts (PlanOverride): no share, so the stage keeps its count, the best first
    scores = torch.cat([torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3]), torch.zeros(4)])
    assert kept(get("feather"), Stage(2, 2), HandContext(5, scores=scores), index=1) == [1, 3]


def test_feather_later_stage_keeps_at_least_one_token():
    # 10 tokens reach stage 2 with share 0.09: int(0.9) = 0, so the single best one (token 7) stays
    scores = torch.zeros(14)
    scores[7] = 1.0
    assert kept(get("feather"), Stage(2, 1, share=0.09), HandContext(10, scores=scores), index=1) == [7]


@pytest.mark.parametrize("index, stage", [(0, Stage(1, 20)), (1, Stage(2, 11))])
def test_feather_exact_ties_go_to_the_earlier_token(index, stage):
    # 100 identical tokens score exactly alike (no RoPE in FEATHER's score); 10 x 10 grid, stride 3: 16 grid tokens
    ctx = HandContext(100, scores=torch.full((104,), 0.01))
    grid = {r * 10 + c for r in (0, 3, 6, 9) for c in (0, 3, 6, 9)}
    expected = sorted(grid | {0, 1, 2, 3}) if index == 0 else list(range(11))  # stage 1: 20 - 16 = 4 top tokens
    assert kept(get("feather"), stage, ctx, index=index) == expected


# ----------------------------------------------------------------------------- DART


def test_dart_default_prunes_before_layer_two():
    assert get("dart").plan(576, 32, Budget.parse(128)) == [Stage(2, 128)]  # the paper's K = 2


def test_dart_budget_below_the_pivot_count_keeps_the_largest_key_norms():
    keys = torch.ones(12, 8)
    keys[[5, 2, 7, 1], 0] = torch.tensor([9.0, 8.0, 7.0, 6.0])  # image keys by L1 norm: 5, 2, 7, 1, then the rest
    ctx = HandContext(8, keys=keys, hidden=torch.randn(12, 8))
    assert kept(get("dart"), Stage(2, 3), ctx) == [2, 5, 7]
    assert ctx.requests == [("keys", 1, True)]  # layer K-1's keys, after RoPE
    assert kept(get("dart"), Stage(2, 4), ctx) == [1, 2, 5, 7]  # exactly the pivots: no picks


def test_dart_ranks_by_cosine_not_by_dot_product():
    # pivot 0 = (1, 0). Candidate 1 = (0.1, -0.05): cosine 0.89, dot 0.1; candidate 2 = (1, 5): cosine 0.20, dot 1.
    # The least duplicated by cosine is 2 (by the raw dot product it would be 1).
    hidden = torch.zeros(7, 2)
    hidden[0], hidden[1], hidden[2] = torch.tensor([1.0, 0.0]), torch.tensor([0.1, -0.05]), torch.tensor([1.0, 5.0])
    keys = torch.ones(7, 2)
    keys[0] = 5.0
    ctx = HandContext(3, keys=keys, hidden=hidden)
    assert kept(get("dart", image_pivots=1, text_pivots=0), Stage(2, 2), ctx) == [0, 2]


def test_dart_single_pivot_takes_the_whole_remaining_budget_and_the_last_candidate():
    ctx = HandContext(2, keys=torch.ones(6, 8), hidden=torch.randn(6, 8))
    assert kept(get("dart", image_pivots=1, text_pivots=0), Stage(2, 2), ctx) == [0, 1]  # one candidate left: taken
    ctx = HandContext(20, keys=torch.ones(24, 8), hidden=torch.ones(24, 8))
    # 20 identical tokens: pivot 0 (ties: the earlier), then 4 picks all at cosine 1 (ties: the earlier)
    assert kept(get("dart", image_pivots=1, text_pivots=0), Stage(2, 5), ctx) == [0, 1, 2, 3, 4]


def test_dart_key_norm_ties_go_to_the_earlier_token():
    # 20 image and 20 text tokens, all keys alike. Image pivots: 0..3.
    ctx = HandContext(20, n_text=20, keys=torch.ones(40, 8), hidden=torch.ones(40, 8))
    assert kept(get("dart", text_pivots=0), Stage(2, 4), ctx) == [0, 1, 2, 3]
    # text pivots 20..23; text token 20 + i is e_i and image token i is -e_i, so pivot 20 + i picks image token i
    hidden = torch.zeros(40, 40)
    hidden[torch.arange(20), torch.arange(20)] = -1.0
    hidden[torch.arange(20, 40), torch.arange(20)] = 1.0
    ctx = HandContext(20, n_text=20, keys=torch.ones(40, 8), hidden=hidden)
    assert kept(get("dart", image_pivots=0), Stage(2, 4), ctx) == [0, 1, 2, 3]


def test_duplication_picks_with_nothing_to_pick_is_an_empty_index():
    picks = duplication_picks(torch.randn(5, 4), torch.arange(1, 5), [0], [0])
    assert picks.dtype == torch.long and picks.numel() == 0


class OneStagePlan:
    """A stub in-LLM method: before layer 1 of a 2-layer model, keep ``scale * budget`` of ``n`` image tokens
    (at most n). Its layer average is (n + min(scale * k, n)) / 2, so each budget step moves it by scale / 2:
    half a token (scale 1) or two tokens (scale 4), finer and coarser than FastV's."""

    name = "stub"

    def __init__(self, scale: int):
        self.scale = scale

    def plan(self, n_image, num_layers, budget):
        return [Stage(1, min(self.scale * budget.tokens(n_image), n_image))]


def test_budget_for_average_accepts_the_direct_count_within_one_token_and_else_searches():
    from vtc.methods.llm_base import budget_for_average

    fine = OneStagePlan(scale=1)  # n = 10: average(k) = (10 + k) / 2
    # target 8: the direct count 8 averages 9, one token off: accepted as it is (not the search's 6).
    assert budget_for_average(fine, 8, n_image=10, num_layers=2) == Budget("count", 8)
    # target 6: the direct count 6 averages 8, two off: refused; the search's smallest count reaching 6 is 2
    # (bisection 1..10: 5 -> 7.5, 3 -> 6.5, 2 -> 6.0, 1 -> 5.5), exactly on target.
    assert budget_for_average(fine, 6, n_image=10, num_layers=2) == Budget("count", 2)


def test_budget_for_average_after_the_search_tolerates_one_token_and_starts_at_one():
    from vtc.methods.llm_base import budget_for_average

    coarse = OneStagePlan(scale=4)  # n = 40: average(k) = (40 + min(4k, 40)) / 2 = 20 + 2k up to k = 10
    # target 25: direct 25 averages 40; the search stops at k = 3 (average 26), one token over: accepted.
    assert budget_for_average(coarse, 25, n_image=40, num_layers=2) == Budget("count", 3)
    # target 21.5: only k = 1 (average 22) is within a token; the search must try the one-token budget.
    assert budget_for_average(coarse, 21.5, n_image=40, num_layers=2) == Budget("count", 1)
    # target 20: the least average is 22 (k = 1), two tokens over: out of reach, said by name.
    with pytest.raises(VTCError, match="stub: a layer average of 20 image tokens is out of reach"):
        budget_for_average(coarse, 20, n_image=40, num_layers=2)
