"""SparseVLM's parts by hand: raters, density-peaks clustering, the recycled count, plans and the rank schedule.

Each case was written for a mutant that survived the model-based tests (test_in_llm_selection.py) and
checks the official rule on inputs random tiny models never produce: a text whose tokens all rate alike,
one- and three-token recycling pools, exact ties, hidden states far from the origin, plans at the edge of
what the stages allow, attention blocks of known rank. Expected values are worked out in the comments or
come from plain loops over the official formulas.
"""

import math

import pytest
import torch

from vtc.methods import Budget, get
from vtc.methods.llm_base import Stage
from vtc.methods.sparsevlm import density_peaks, recycled_count, select_raters


class RaterContext:
    """One sample: image rows 0..n-1, then text rows. ``attention`` is the full (L, L) head-mean map the stage reads.

    Embeddings (for the raters) and hidden states (for the clustering) are both ``hidden``.
    """

    def __init__(self, n_image: int, attention: torch.Tensor, hidden: torch.Tensor | None = None):
        length = attention.shape[0]
        self.image_rows, self.text_rows, self.last_row = [torch.arange(n_image)], [torch.arange(n_image, length)], length - 1
        hidden = torch.zeros(length, 4) if hidden is None else hidden
        self.hidden = self.previous = self.embeds = hidden[None]
        self.map = attention

    def positions(self, b):
        return torch.arange(self.hidden.shape[1])

    def attention(self, layer, states, queries, rope=True, keys=None):
        return [self.map[q] for q in queries]


def same_row_for_every_query(scores: list[float], n_text: int = 4) -> torch.Tensor:
    """An attention map whose every row is ``scores`` on the image tokens (0 on the text)."""
    row = torch.cat([torch.tensor(scores), torch.zeros(n_text)])
    return row.expand(row.numel(), -1)


# ----------------------------------------------------------------------------- raters


def test_raters_when_no_text_token_is_above_the_mean_are_the_best_one():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # one text token: its relevance 1.0 is the mean, not above it; the fallback keeps it
    assert select_raters(image, torch.tensor([[2.0, 1.0]])).tolist() == [0]
    # two identical text tokens: relevance (0.5, 0.5), none above the mean 0.5; the first of the best
    assert select_raters(image, torch.tensor([[2.0, 1.0], [2.0, 1.0]])).tolist() == [0]
    # four tokens, two identical pairs: softmax over (3, 3, 0, 0) for each image token -> the first pair is above
    text = torch.tensor([[3.0, 3.0], [3.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    assert select_raters(image, text).tolist() == [0, 1]


# ----------------------------------------------------------------------------- density peaks


def naive_dpc(x: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN with plain loops over the official formulas (k = clusters, self among the k nearest): (labels, centers).

    Exact density ties: the later row counts as denser (vtc's documented rule; the official code adds noise).
    Centers: the top ``clusters`` by density x parent distance, equal products in row order.
    """
    rows = [[float(v) for v in r] for r in x]
    n, dim = len(rows), len(rows[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) / dim) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:clusters]) / clusters) for i in range(n)]
    largest = max(max(r) for r in dist)
    parent = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j > i)]
        parent.append(min(denser) if denser else largest)
    centers = sorted(range(n), key=lambda i: (-density[i] * parent[i], i))[:clusters]
    labels = []
    for i in range(n):
        if i in centers:
            labels.append(centers.index(i))
        else:
            labels.append(min(range(clusters), key=lambda c: (dist[i][centers[c]], c)))
    return labels, centers


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clusters", [1, 2, 3, 4])
def test_density_peaks_equals_the_plain_loop(seed, clusters):
    # coordinates on a 1/8 grid over a wide range: distances are exact and exact density ties are unlikely
    x = torch.randint(-40, 40, (12, 3), generator=torch.Generator().manual_seed(seed)).float() / 8
    labels, centers = density_peaks(x, clusters, clusters)
    assert (labels.tolist(), centers.tolist()) == naive_dpc(x, clusters)


def test_density_peaks_three_rows_one_cluster_by_hand():
    # k = 1: each row's only neighbour is itself, every density is exp(0) = 1 and the later row counts as denser.
    # Rows on a line at 0, 1, 3 (dim 2: distances / sqrt 2). Parent distances: row 0 -> 1/sqrt2 (to row 1),
    # row 1 -> 2/sqrt2 (to row 2), row 2 (densest) -> the largest distance 3/sqrt2. Center: row 2.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    labels, centers = density_peaks(x, 1, 1)
    assert centers.tolist() == [2] and labels.tolist() == [0, 0, 0]
    # k = 2 (two clusters): nearest other rows 1/sqrt2, 1/sqrt2, 2/sqrt2 -> densities exp(-1/4), exp(-1/4), exp(-1);
    # rows 0 and 1 tie, row 1 (later) is the denser: parent distances 1/sqrt2 (row 0), 3/sqrt2 (row 1, densest),
    # 2/sqrt2 (row 2, nearest denser is row 1). Scores: row 0 0.55, row 1 1.65, row 2 0.52 -> centers 1, 0.
    labels, centers = density_peaks(x, 2, 2)
    assert centers.tolist() == [1, 0] and labels.tolist() == [1, 0, 0]


def test_density_peaks_of_a_single_row_is_its_own_cluster():
    labels, centers = density_peaks(torch.tensor([[0.5, -1.0, 2.0]]), 1, 1)
    assert labels.tolist() == [0] and centers.tolist() == [0]


def test_density_peaks_ignores_a_shift_far_from_the_origin():
    # LLM hidden states carry a few very large channels. Distances must be taken as |a - b|, not through
    # |a|^2 + |b|^2 - 2ab, which loses the small differences once the rows are large (torch.cdist's matrix path,
    # used above 25 rows). 30 rows on a 1/8 grid, then the same rows shifted by 1024: exact in float32 either way.
    x = torch.randint(-16, 16, (30, 4), generator=torch.Generator().manual_seed(0)).float() / 8
    labels, centers = density_peaks(x, 3, 3)
    assert (labels.tolist(), centers.tolist()) == naive_dpc(x, 3)
    shifted_labels, shifted_centers = density_peaks(x + 1024.0, 3, 3)
    assert shifted_labels.tolist() == labels.tolist() and shifted_centers.tolist() == centers.tolist()


def test_density_peaks_equal_scores_give_the_earlier_rows_as_centers():
    # 20 identical rows (a flat image region): all distances 0, every density 1, every parent distance 0, so every
    # score is 0; the centers are the first three rows, each its own cluster; the others join the first center.
    labels, centers = density_peaks(torch.ones(20, 4), 3, 3)
    assert centers.tolist() == [0, 1, 2]
    assert labels.tolist() == [0, 1, 2] + [0] * 17


# ----------------------------------------------------------------------------- the recycled count


def official_clusters(dropped: int) -> int:
    """The official code's cluster count for ``dropped`` tokens: int(len(pool) / 10) + 1, pool = int(0.3 dropped) + 1."""
    return int((int(dropped * 0.3) + 1) / 10) + 1


def test_recycled_count_by_hand():
    # keep 90 of 100: with c = 1 merged, 11 are dropped, pool int(3.3) + 1 = 4 -> 1 cluster: c = 1
    assert recycled_count(100, 90) == 1
    # keep 71 of 100: c = 1 drops 30, pool 10 -> 2 clusters (more than 1); c = 2 drops 31, pool 10 -> 2: c = 2
    assert recycled_count(100, 71) == 2
    # the 192 schedule's first stage (keep 192 of 576): c = 11 drops 395, pool 119 -> 12; c = 12 drops 396, pool 119 -> 12
    assert recycled_count(576, 192) == 12
    # keep 2 of 576: one merged token leaves 575 dropped, pool 173 -> 18 clusters: no c below 2 fits, so c = keep - 1
    assert recycled_count(576, 2) == 1
    assert recycled_count(576, 3) == 2
    assert recycled_count(10, 1) == 0  # keeping one token leaves nothing to merge into


def test_recycled_count_is_the_cluster_count_of_its_own_pool():
    for n in (10, 31, 100, 576):
        for keep in range(2, n):
            c = recycled_count(n, keep)
            fits = [m for m in range(1, keep) if official_clusters(n - (keep - m)) == m]
            assert c == (fits[0] if fits else keep - 1), (n, keep)


# ----------------------------------------------------------------------------- choose


def test_a_stage_keeping_every_present_token_keeps_them_all_without_merging():
    ctx = RaterContext(6, same_row_for_every_query([0.3, 0.1, 0.5, 0.2, 0.4, 0.6]), torch.randn(10, 4))
    choice = get("sparsevlm", layers=(1,)).choose(0, [Stage(1, 6)], ctx)[0]
    assert choice.keep.tolist() == [0, 1, 2, 3, 4, 5] and choice.merged is None


def test_keep_eight_of_ten_recycles_the_eighth_token_alone():
    # c = 1 (2 + 1 dropped -> pool 1): the top 7 are kept, the pool is the 8th-ranked token, a cluster of one
    hidden = torch.randn(14, 4, generator=torch.Generator().manual_seed(1))
    ctx = RaterContext(10, same_row_for_every_query([10.0 - j for j in range(10)]), hidden)
    choice = get("sparsevlm", layers=(1,)).choose(0, [Stage(1, 8)], ctx)[0]
    assert choice.keep.tolist() == list(range(7)) and choice.info["recycled"] == 1
    assert choice.merged_positions.tolist() == [7]
    torch.testing.assert_close(choice.merged, hidden[7:8])


def test_keep_two_recycles_one_token_from_the_best_three_dropped():
    # keep 2 of 10: c = 1 -> kept token 0; dropped 1..9, pool int(2.7) + 1 = 3 -> tokens 1, 2, 3, one cluster.
    # k = 1: all densities 1, the later token counts as denser; tokens 1, 2, 3 sit at 0, 1, 3 on a line, so the
    # center is token 3 (its parent distance is the largest one, see the three-row case above).
    hidden = torch.zeros(14, 2)
    hidden[1:4, 0] = torch.tensor([0.0, 1.0, 3.0])
    ctx = RaterContext(10, same_row_for_every_query([10.0 - j for j in range(10)]), hidden)
    choice = get("sparsevlm", layers=(1,)).choose(0, [Stage(1, 2)], ctx)[0]
    assert choice.keep.tolist() == [0] and choice.info["recycled"] == 1
    assert choice.merged_positions.tolist() == [3]
    torch.testing.assert_close(choice.merged, torch.tensor([[4.0 / 3, 0.0]]))


def test_equal_rater_scores_keep_the_earlier_tokens():
    # quantised scores: tokens 0, 3, ..., 21 score 1.0, the rest 0.5; keep 10 of 24 -> the 8 best, then 1 and 2
    scores = [1.0 if j % 3 == 0 else 0.5 for j in range(24)]
    ctx = RaterContext(24, same_row_for_every_query(scores))
    choice = get("sparsevlm", layers=(1,), recycling=False).choose(0, [Stage(1, 10)], ctx)[0]
    assert choice.keep.tolist() == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21]


# ----------------------------------------------------------------------------- the rank schedule


def rank_two_context(n_image: int = 40) -> RaterContext:
    """Raters: text rows n and n+1 (text 0 and 1 align with every image token, 2 and 3 with none).

    Their attention rows over the image are a_j and a_j^2 with a_j = (n - j) / 100: two independent rows (rank 2),
    and their mean falls with j, so the top-k image tokens are 0..k-1.
    """
    length = n_image + 4
    hidden = torch.zeros(length, 4)
    hidden[:n_image, :2] = 1.0
    hidden[n_image, 0] = hidden[n_image + 1, 1] = 5.0
    a = (n_image - torch.arange(n_image, dtype=torch.float32)) / 100
    attention = torch.zeros(length, length)
    attention[n_image, :n_image], attention[n_image + 1, :n_image] = a, a**2
    return RaterContext(n_image, attention, hidden)


@pytest.mark.parametrize("options, keep", [
    ({}, 27),                           # the default constants 13.5 x rank + 0: int(27.0)
    ({"scale": 9.0, "bias": 6.0}, 24),  # POPE 128's constants: 9 x 2 + 6
    ({"scale": 0.4}, 1),                # int(0.8) = 0: at least one token
    ({"scale": 30.0}, 40),              # 60 is more than the 40 present: all of them
])
def test_rank_schedule_keeps_scale_times_the_attention_rank_plus_bias(options, keep):
    method = get("sparsevlm", layers=(1,), schedule="rank", recycling=False, **options)
    choice = method.choose(0, [Stage(1, 40)], rank_two_context())[0]
    assert choice.keep.tolist() == list(range(keep))


# ----------------------------------------------------------------------------- plans


def layer_average(n: int, counts: list[int]) -> float:
    """Image tokens per layer over 32 layers with stages before layers 2, 6, 15."""
    return (2 * n + 4 * counts[0] + 9 * counts[1] + 17 * counts[2]) / 32


def test_plan_scales_the_schedule_nearest_to_the_targets_share_of_576():
    # 1153 image tokens: 224 is 111.9 of 576, nearer the 96 schedule (238, 48, 26) than 128's (303, 110, 36);
    # 225 is 112.4 of 576, nearer 128's. The plan keeps the nearest schedule's proportions.
    for target, shape in ((224, (238, 48, 26)), (225, (303, 110, 36))):
        counts = [s.keep for s in get("sparsevlm").plan(1153, 32, Budget.parse(target))]
        assert abs(layer_average(1153, counts) - target) <= 0.5
        for c, s in zip(counts[1:], shape[1:]):
            assert abs(c / counts[0] - s / shape[0]) < 0.01, (target, counts)


def test_plan_just_above_the_least_average_keeps_one_token_at_later_stages():
    # 64 tokens, 8 layers: stages before layers 1, 2, 4 (2/32, 6/32, 15/32 of 8, rounded). One token per stage
    # averages (64 + 7 x 1) / 8 = 8.875; the first stage at 2 makes (64 + 2 + 6 x 1) / 8 = 9, the target.
    plan = get("sparsevlm").plan(64, 8, Budget.parse(9))
    assert [(s.layer, s.keep) for s in plan] == [(1, 2), (2, 1), (4, 1)]
