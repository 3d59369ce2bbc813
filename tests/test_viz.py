import numpy as np
import torch
from PIL import Image

from vtc.methods import Origin, Selection
from vtc.viz import COLOURS, patch_labels, token_map


def test_token_map_tints_each_patch_by_its_fate():
    feats = torch.randn(4, 3)
    # patch 0 kept, patch 1 recovered, patches 2+3 merged into one token
    sel = Selection.build(feats, torch.tensor([0, 1]), torch.tensor([Origin.KEPT, Origin.RECOVERED]),
                          feats[2:].mean(0, keepdim=True), [torch.tensor([2, 3])])
    assert patch_labels(sel) == ["kept", "recovered", "merged", "merged"]
    white = Image.new("RGB", (10, 10), (255, 255, 255))
    out = np.asarray(token_map(white, sel, (2, 2), size=20, alpha=1.0))
    assert tuple(out[2, 2]) == COLOURS["kept"] and tuple(out[2, 15]) == COLOURS["recovered"]
    assert tuple(out[15, 2]) == COLOURS["merged"] == tuple(out[15, 15])
    dropped = Selection.build(feats, torch.tensor([0]))
    assert patch_labels(dropped) == ["kept", "dropped", "dropped", "dropped"]


def test_box_maps_equal_the_grid_map_and_place_tiles_where_they_are():
    from vtc.models.llava import grid_boxes
    from vtc.viz import layout_token_map, panel_map

    feats = torch.randn(12, 3)
    sel = Selection.build(feats, torch.tensor([0, 5, 7]), torch.tensor([Origin.KEPT, Origin.RECOVERED, Origin.KEPT]),
                          feats[8:].mean(0, keepdim=True), [torch.tensor([8, 9, 10])])
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (30, 40, 3), dtype=np.uint8))
    for grid, size in [((3, 4), 24), ((4, 3), 37), ((2, 6), 25), ((3, 4), 7)]:  # the box path paints what the grid path paints
        by_grid = np.asarray(token_map(image, sel, grid, size=size))
        by_box = np.asarray(panel_map(image, patch_labels(sel), grid_boxes(grid).numpy(), size=size))
        assert np.array_equal(by_grid, by_box), grid
    # two views side by side: panel 1 = candidates 0-3 on a 2x2 grid, panel 2 = candidates 4-11 on a 2x4 grid
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    panels = [("base", torch.arange(4), grid_boxes((2, 2))), ("tiles", 4 + torch.arange(8), grid_boxes((2, 4)))]
    sheet = np.asarray(layout_token_map(white, sel, panels, size=16, gap=2))
    assert sheet.shape == (16, 34, 3)
    assert tuple(sheet[2, 2]) != tuple(sheet[2, 10])  # base: candidate 0 kept, 1 dropped
    # tiles panel starts at x = 18; candidate 5 is its cell (0, 1) -> recovered, candidate 8 its cell (1, 0) -> merged
    def tint(label):
        return tuple(np.asarray(panel_map(white, [label], np.array([[0, 0, 1, 1]]), size=1))[0, 0])
    assert tuple(sheet[2, 18 + 6]) == tint("recovered") and tuple(sheet[12, 18 + 2]) == tint("merged")
