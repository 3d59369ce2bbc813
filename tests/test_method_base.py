"""The method registry and the Method base class, independent of any one method."""

import pytest
import torch

from vtc.methods import Selection, Signal, Signals, VTCError, available, get
from vtc.methods.base import _REGISTRY, Method, register, register_factory


@pytest.fixture
def scratch_names():
    before = set(_REGISTRY)
    yield
    for name in set(_REGISTRY) - before:
        del _REGISTRY[name]


def test_register_makes_a_class_available_by_name_once(scratch_names):
    @register("first-patch")
    class FirstPatch(Method):
        """Keeps the first patch.

        More words that are not the summary."""

        def select_one(self, signals, budget):
            return Selection.build(signals.features[0], torch.tensor([0]))

    assert "first-patch" in available() and FirstPatch.name == "first-patch"
    method = get("first-patch")
    assert isinstance(method, FirstPatch) and method.describe() == "Keeps the first patch."
    [sel] = method.select(Signals(torch.randn(1, 4, 2), (2, 2)), 1)
    assert sel.kept_indices().tolist() == [0]
    with pytest.raises(ValueError, match="'first-patch' is registered twice"):
        register("first-patch")(FirstPatch)


def test_register_factory_and_describe_without_a_docstring(scratch_names):
    class Bare(Method):
        def select_one(self, signals, budget):
            return Selection.build(signals.features[0], torch.tensor([1]))

    register_factory("bare-preset", lambda **options: Bare())
    method = get("bare-preset")
    assert isinstance(method, Bare) and method.name == "bare-preset"
    assert method.describe() == "bare-preset"  # no docstring: the name
    with pytest.raises(ValueError, match="'bare-preset' is registered twice"):
        register_factory("bare-preset", Bare)
    with pytest.raises(VTCError, match="unknown method"):
        get("bare-preset-2")


def test_kept_indices_is_an_index_tensor_even_when_nothing_is_kept():
    feats = torch.randn(6, 2)
    merged_only = Selection.build(feats, torch.empty(0, dtype=torch.long), merged_tokens=feats[:2].clone(),
                                  merged_sources=[torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])])
    kept = merged_only.kept_indices()
    assert kept.dtype == torch.long and kept.numel() == 0
    assert feats[kept].shape == (0, 2)  # usable as an index


def _signals_with(bad_name: str | None, value: float, b=2, n=16, d=4):
    from vtc.methods import Signals

    s = Signals(torch.randn(b, n, d), (4, 4), cls_attn=torch.rand(b, n), projected=torch.randn(b, n, 6))
    if bad_name is not None:
        getattr(s, bad_name)[1, 3] = value
    return s


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["features", "cls_attn"])
def test_select_refuses_a_non_finite_signal_it_reads(name, value):
    from vtc.methods import VTCError, get

    with pytest.raises(VTCError, match=f"signal '{name}' contains NaN or inf"):
        get("fastervlm").select(_signals_with(name, value), 4)


def test_finiteness_is_checked_for_the_signals_a_method_reads_and_once_per_signals_object():
    from vtc.methods import get

    s = _signals_with("projected", float("nan"))  # fastervlm does not read the projected tokens
    get("fastervlm").select(s, 4)
    assert s._finite == {"features", "cls_attn"}
    s.cls_attn[0, 0] = float("nan")  # changed in place after the check: documented as not re-checked
    get("fastervlm").select(s, 4)
    with pytest.raises(Exception, match="projected"):
        s.validate()  # the full check still sees the unread signal


def test_all_finite_survives_an_overflowing_sum():
    from vtc.methods.base import all_finite

    big = torch.full((4,), 6e4, dtype=torch.float16)  # the fp16 sum overflows unless accumulated wider
    assert all_finite(big)
    assert all_finite(torch.full((3,), 3e38))  # fp32 sum overflows to inf: falls back to the entrywise check
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # the sum is NaN, either way refused
    assert all_finite(torch.arange(5))  # integer tensors cannot hold NaN


def _naive_owner(n, kept, merged_sources, anchors, g=0):
    """Ownership claimed one token after the other, in output order (the definition)."""
    owner = [-1] * n
    for i, p in enumerate(kept):
        owner[p] = g + i
    first = g + len(kept)
    for j, a in enumerate(anchors):
        if a >= 0 and owner[a] < 0:
            owner[a] = first + j
    for j, src in enumerate(merged_sources):
        for p in src:
            if owner[p] < 0:
                owner[p] = first + j
    return owner


@pytest.mark.parametrize("seed", range(25))
def test_build_owner_and_sources_equal_claiming_one_token_after_the_other(seed):
    from vtc.methods import Origin

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 30, (1,), generator=g))
    perm = torch.randperm(n, generator=g)
    k = int(torch.randint(0, n + 1, (1,), generator=g))
    kept = perm[:k]
    m = int(torch.randint(0, 5, (1,), generator=g))
    merged_sources = [torch.randint(0, n, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g) for _ in range(m)]
    anchors = [int(s[0]) if torch.rand(1, generator=g) < 0.6 else -1 for s in merged_sources]
    glob = int(torch.randint(0, 2, (1,), generator=g))
    feats = torch.randn(n, 3, generator=g)
    sel = Selection.build(
        feats, kept, merged_tokens=torch.randn(m, 3, generator=g), merged_sources=merged_sources,
        merged_anchors=anchors, global_tokens=torch.randn(glob, 3, generator=g) if glob else None,
    )
    assert sel.owner.tolist() == _naive_owner(n, kept.tolist(), [s.tolist() for s in merged_sources], anchors, glob)
    expected_sources = [[]] * glob + [[p] for p in kept.tolist()] + [s.tolist() for s in merged_sources]
    assert [s.tolist() for s in sel.sources] == expected_sources
    assert sel.kept_indices().tolist() == kept.tolist()
    assert sel.origin.tolist() == [Origin.GLOBAL] * glob + [Origin.KEPT] * k + [Origin.MERGED] * m
    assert torch.equal(sel.tokens[glob : glob + k], feats[kept])


@pytest.mark.parametrize("seed", range(25))
def test_build_batch_equals_claiming_one_token_after_the_other_in_every_image(seed):
    """Images of one batch share counts (k kept, m merged, F flat sources) but not how F splits among
    the merged tokens: some get none, one gets all. Each image is checked against the definition."""
    from vtc.methods import Origin

    g = torch.Generator().manual_seed(seed)
    b, n = 3, int(torch.randint(1, 30, (1,), generator=g))
    k, m = int(torch.randint(0, n + 1, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
    f = int(torch.randint(m, 3 * n, (1,), generator=g)) if m else 0
    kept = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    flat = torch.randint(0, n, (b, f), generator=g)
    cuts = torch.randint(0, f + 1, (b, max(m - 1, 0)), generator=g).sort(dim=1).values
    edges = torch.cat([torch.zeros(b, 1, dtype=torch.long), cuts, torch.full((b, 1), f)], dim=1)
    sizes = edges.diff(dim=1) if m else torch.zeros(b, 0, dtype=torch.long)
    anchors = torch.where(torch.rand(b, m, generator=g) < 0.6, torch.randint(0, n, (b, m), generator=g), -1)
    glob = int(torch.randint(0, 2, (1,), generator=g))
    origin = torch.randint(0, 2, (b, k), generator=g)
    feats = torch.randn(b, n, 3, generator=g)
    sels = Selection.build_batch(
        feats, kept, origin, torch.randn(b, m, 3, generator=g), (flat, sizes), anchors,
        info=[{"image": i} for i in range(b)], global_tokens=torch.randn(b, glob, 3, generator=g),
    )
    for i, sel in enumerate(sels):
        sources = [flat[i, e0:e1].tolist() for e0, e1 in zip(edges[i, :-1].tolist(), edges[i, 1:].tolist())][:m]
        assert sel.owner.tolist() == _naive_owner(n, kept[i].tolist(), sources, anchors[i].tolist(), glob)
        assert [s.tolist() for s in sel.sources] == [[]] * glob + [[p] for p in kept[i].tolist()] + sources
        assert sel.origin.tolist() == [Origin.GLOBAL] * glob + origin[i].tolist() + [Origin.MERGED] * m
        assert torch.equal(sel.tokens[glob : glob + k], feats[i, kept[i]]) and sel.info == {"image": i}


def test_merged_tokens_and_their_source_lists_must_match_in_number():
    feats = torch.zeros(3, 2)
    with pytest.raises(AssertionError, match="source list"):  # sources for a merged token that is not there
        Selection.build(feats, torch.tensor([0]), merged_sources=[torch.tensor([1, 2])])
    with pytest.raises(AssertionError, match="source list"):  # a merged token without sources
        Selection.build(feats, torch.tensor([0]), merged_tokens=torch.zeros(1, 2))
    with pytest.raises(AssertionError, match="source list"):
        Selection.build_batch(feats[None], torch.tensor([[0]]), merged_tokens=torch.zeros(1, 2, 2),
                              merged_sources=(torch.tensor([[1, 2]]), torch.tensor([[2]])))


def test_selection_needs_one_form_of_provenance():
    with pytest.raises(VTCError, match="either a sources list"):
        Selection(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), owner=torch.zeros(1, dtype=torch.long))
    listed = Selection(torch.zeros(2, 2), torch.tensor([0, 2]), [torch.tensor([1]), torch.tensor([0, 1])], torch.tensor([1, 0]))
    assert listed.source_sizes.tolist() == [1, 2] and listed.source_index.tolist() == [1, 0, 1]
    assert listed.kept_indices().tolist() == [1]


def test_a_method_implementing_neither_selection_hook_says_so_by_name():
    class Nothing(Method):
        name = "nothing-here"
        needs = frozenset({Signal.FEATURES})

    signals = Signals(features=torch.zeros(1, 4, 2), grid=(2, 2))
    with pytest.raises(NotImplementedError, match="'nothing-here' implements neither select_batch nor select_one"):
        Nothing().select(signals, 2)


def test_from_partition_equals_build_with_kept_patches_then_merged_groups():
    """A hand-worked partition of 7 patches into 4 tokens per image: kept patches 1 and 5 (raster order), then the
    merged groups {0, 2, 3} and {4, 6}; a second image with other groups. Each image equals ``build``."""
    feats = torch.randn(2, 7, 3)
    owner = torch.tensor([[2, 0, 2, 2, 3, 1, 3], [2, 2, 0, 1, 3, 3, 3]])
    sizes = torch.tensor([[1, 1, 3, 2], [1, 1, 2, 3]])
    tokens = torch.randn(2, 4, 3)
    out = Selection.from_partition(tokens, owner, sizes)
    expected = [
        Selection.build(feats[0], torch.tensor([1, 5]), merged_tokens=tokens[0, 2:], merged_sources=[torch.tensor([0, 2, 3]), torch.tensor([4, 6])]),
        Selection.build(feats[1], torch.tensor([2, 3]), merged_tokens=tokens[1, 2:], merged_sources=[torch.tensor([0, 1]), torch.tensor([4, 5, 6])]),
    ]
    for got, want, image in zip(out, expected, range(2)):
        assert torch.equal(got.tokens[2:], want.tokens[2:])
        assert got.origin.tolist() == want.origin.tolist() == [0, 0, 2, 2]
        assert got.owner.tolist() == want.owner.tolist() == owner[image].tolist()
        assert [s.tolist() for s in got.sources] == [s.tolist() for s in want.sources]
