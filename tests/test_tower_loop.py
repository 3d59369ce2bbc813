"""The in-tower reduction hook (models/tower_loop.py) against the stock CLIP tower run layer by layer."""

import pytest
import torch

from vtc.methods import Origin, VTCError
from vtc.models.tower_loop import LayerView, Reduction, run_tower
from vtc.testing import clip_configs

PREFIX = 1


@pytest.fixture(scope="module")
def tower():
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    _, vision = clip_configs(image_size=48, patch_size=8, layers=4)  # 36 patches, 4 layers
    model = CLIPVisionModel(vision).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def first_input(tower, pixels):
    return tower.pre_layrnorm(tower.embeddings(pixels))


class Recorder:
    """Keeps nothing out: records what each layer's view shows."""

    def __init__(self, stage, size_bias=True):
        self.stage, self.size_bias, self.views = stage, size_bias, []

    def __call__(self, view: LayerView):
        self.views.append(view)
        return None


class DropAt:
    """Drops ``drop[b]`` (patch positions, same count per image) after layer ``at``."""

    def __init__(self, at, drop, stage="layer"):
        self.at, self.drop, self.stage, self.size_bias = at, drop, stage, True

    def __call__(self, view):
        if view.index != self.at:
            return None
        t = view.hidden.shape[1]
        keep = torch.stack([torch.tensor([i for i in range(t) if i not in set(d)]) for d in self.drop])
        return Reduction(keep)


@torch.no_grad()
def test_a_callback_that_does_nothing_gives_the_stock_feature_layer(tower, pixels):
    stock = tower(pixels, output_hidden_states=True).hidden_states
    for stage in ("attention", "layer"):
        recorder = Recorder(stage)
        state = run_tower(tower.encoder.layers[:3], first_input(tower, pixels), recorder, PREFIX, 4)
        assert torch.equal(state.hidden, stock[3])  # the feature layer -2 of a 4-layer tower, bit for bit
        assert [v.index for v in recorder.views] == [0, 1, 2] and all(v.depth == 3 for v in recorder.views)
        assert all(v.bias is None for v in recorder.views)  # every size is 1: no mask, SDPA's own path
    [sel] = state.selections()[:1]
    assert sel.num_tokens == 36 and sel.kept_indices().tolist() == list(range(36))
    torch.testing.assert_close(sel.tokens, stock[3][0, 1:], rtol=0, atol=0)


@torch.no_grad()
def test_the_view_gives_each_layers_qkv_and_cls_attention_row(tower, pixels):
    """q/k/v and the CLS row against eager attention's own weights (output_attentions)."""
    recorder = Recorder("layer")
    run_tower(tower.encoder.layers[:3], first_input(tower, pixels), recorder, PREFIX, 4)
    tower.config._attn_implementation = "eager"
    try:
        eager = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    for i, view in enumerate(recorder.views):
        assert view.queries.shape == view.keys.shape == view.values.shape == (2, 4, 37, 8)
        torch.testing.assert_close(view.cls_attention(), eager.attentions[i][:, :, 0], rtol=0, atol=1e-6)
        layer = tower.encoder.layers[i]
        normed = layer.layer_norm1(eager.hidden_states[i])
        v = layer.self_attn.v_proj(normed).view(2, 37, 4, 8).transpose(1, 2)
        torch.testing.assert_close(view.values, v)


def masked_stock(tower, pixels, depth, at, drop, size=None):
    """The stock encoder layers, the dropped tokens masked out of every attention after layer ``at``;
    ``size``: a (B, T) log-size bias for every layer (proportional attention written as a stock mask)."""
    hidden = first_input(tower, pixels)
    b, t, _ = hidden.shape
    mask = torch.zeros(b, 1, 1, t)
    for i, d in enumerate(drop):
        mask[i, 0, 0, torch.tensor(d)] = torch.finfo(torch.float32).min
    for index, layer in enumerate(tower.encoder.layers[:depth]):
        hidden = layer(hidden, mask if index > at else None)
    return hidden


@pytest.mark.parametrize("stage", ["layer", "attention"])
@torch.no_grad()
def test_dropping_tokens_equals_masking_them_out_of_attention_from_then_on(tower, pixels, stage):
    drop = [[3, 4, 10, 20, 36], [1, 2, 17, 18, 30]]  # positions with the CLS at 0: patches 2, 3, 9, 19, 35 / 0, 1, ...
    state = run_tower(tower.encoder.layers[:3], first_input(tower, pixels), DropAt(1, drop, stage), PREFIX, 4)
    expected = masked_stock(tower, pixels, 3, 1, drop)
    for b in range(2):
        kept = [i for i in range(37) if i not in drop[b]]
        torch.testing.assert_close(state.hidden[b], expected[b, kept], rtol=0, atol=1e-5)
        sel = state.selections()[b]
        dropped = [d - PREFIX for d in drop[b]]
        assert sel.kept_indices().tolist() == [p for p in range(36) if p not in dropped]
        assert (sel.owner[dropped] == -1).all() and sel.counts()["kept"] == 31
        torch.testing.assert_close(sel.tokens, expected[b, kept[PREFIX:]], rtol=0, atol=1e-5)


class MergeAt:
    """After layer ``at`` folds position ``src`` into ``dst`` (both images), then ``src2`` into ``dst`` at ``at + 1``."""

    def __init__(self, size_bias):
        self.stage, self.size_bias, self.views = "layer", size_bias, []

    def __call__(self, view):
        self.views.append(view)
        t = view.hidden.shape[1]
        if view.index == 0:  # 7 -> 5 and 9 -> 5
            src, dst = torch.tensor([[7, 9]] * 2), torch.tensor([[5, 5]] * 2)
        elif view.index == 1:  # 5 (now holding 3 patches) -> 2, in the sequence without 7 and 9
            src, dst = torch.tensor([[5]] * 2), torch.tensor([[2]] * 2)
        else:
            return None
        keep = torch.tensor([i for i in range(t) if i not in src[0].tolist()]).expand(2, -1)
        return Reduction(keep, src, dst)


@pytest.mark.parametrize("size_bias", [True, False])
@torch.no_grad()
def test_merges_are_size_weighted_and_the_size_bias_enters_attention(tower, pixels, size_bias):
    """Hand-written: merged rows are size-weighted means; later layers see log(size) in their logits."""
    layers = tower.encoder.layers[:3]
    reducer = MergeAt(size_bias)
    state = run_tower(layers, first_input(tower, pixels), reducer, PREFIX, 4)
    h = layers[0](first_input(tower, pixels), None)
    merged = (h[:, 5] + h[:, 7] + h[:, 9]) / 3
    rest = [i for i in range(37) if i not in (7, 9)]
    h = h[:, rest].clone()
    h[:, 5] = merged
    size = torch.ones(2, 35)
    size[:, 5] = 3
    bias = size.log()[:, None, None, :] if size_bias else None
    h = layers[1](h, bias)
    h2 = h.clone()
    h2[:, 2] = (h[:, 2] + 3 * h[:, 5]) / 4
    keep = [i for i in range(35) if i != 5]
    size[:, 2] = 4
    bias = size[:, keep].log()[:, None, None, :] if size_bias else None
    h = layers[2](h2[:, keep], bias)
    torch.testing.assert_close(state.hidden, h, rtol=0, atol=1e-5)
    assert state.size[0].tolist() == size[0, keep].tolist()
    tower.config._attn_implementation = "eager"  # the CLS row the view gives = eager attention's, with the bias
    try:
        _, weights = layers[2].self_attn(layers[2].layer_norm1(h2[:, keep]), attention_mask=bias)
    finally:
        tower.config._attn_implementation = "sdpa"
    torch.testing.assert_close(reducer.views[2].cls_attention(), weights[:, :, 0], rtol=0, atol=1e-6)
    sel = state.selections()[0]  # patches: 4 (pos 5), 6 (pos 7), 8 (pos 9), 1 (pos 2) -> one merged token
    assert sel.counts() == {"kept": 32, "recovered": 0, "merged": 1, "global": 0}
    assert sel.sources[-1].tolist() == [1, 4, 6, 8] and sel.origin[-1] == Origin.MERGED
    assert sel.owner[[1, 4, 6, 8]].tolist() == [32] * 4


@torch.no_grad()
def test_proportional_attention_changes_the_result_once_sizes_differ(tower, pixels):
    with_bias = run_tower(tower.encoder.layers[:3], first_input(tower, pixels), MergeAt(True), PREFIX, 4)
    without = run_tower(tower.encoder.layers[:3], first_input(tower, pixels), MergeAt(False), PREFIX, 4)
    assert (with_bias.hidden - without.hidden).abs().max() > 1e-3


class Returns:
    def __init__(self, reduction):
        self.stage, self.size_bias, self.reduction = "layer", True, reduction

    def __call__(self, view):
        return self.reduction


@pytest.mark.parametrize("reduction, message", [
    (Reduction(torch.tensor([[1, 2], [1, 2]])), "start with the 1 prefix"),
    (Reduction(torch.tensor([[0, 2, 2], [0, 1, 2]])), "twice"),
    (Reduction(torch.tensor([[0, 99], [0, 1]])), r"in \[0, 37\)"),
    (Reduction(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1], [2]]), torch.tensor([[0], [1]])), "not kept into one"),
    (Reduction(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2], [2]])), "go together"),
    (Reduction(torch.tensor([0, 1])), "keep must be"),
])
@torch.no_grad()
def test_malformed_reductions_are_refused(tower, pixels, reduction, message):
    with pytest.raises(VTCError, match=message):
        run_tower(tower.encoder.layers[:1], first_input(tower, pixels), Returns(reduction), PREFIX, 4)
