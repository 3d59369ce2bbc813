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
