"""LOF's compiled CPU loop (methods/lof_cpu.py) against the torch form it stands in for, bit for bit.

tests/test_lof.py runs every scikit-learn comparison on both forms; this compares the two directly on batches
made to reach every branch: tie-heavy rows, masks that mix brute-force and KD-tree rows, every neighbour count
that changes numpy's summation order."""

import sys

import numpy as np
import pytest
import torch

import vtc.methods.lof as lof
from vtc.methods.lof import local_outlier_factors


@pytest.mark.parametrize("k", [1, 3, 7, 8, 9, 16, 20, 24, 33, 128])
def test_cpu_kernel_gives_the_torch_forms_factors_bit_for_bit(k, monkeypatch):
    """The compiled loop against the torch form on the same batches: random, tie-heavy (scores on a coarse grid,
    duplicates) and masked rows of every size (brute force and KD-tree rows mixed), every neighbour count that
    changes numpy's summation (under 8, multiples of 8 and remainders, the 128 limit)."""
    if lof.cpu_kernel() is None:
        pytest.skip("numba is not installed: no compiled CPU kernel")
    rng = np.random.default_rng(k)
    width = 300
    batches = [
        torch.from_numpy(rng.normal(size=(6, width))),
        torch.from_numpy(np.round(rng.normal(size=(6, width)) * 4) / 4),  # two-sided ties and duplicates
        torch.from_numpy(rng.dirichlet(np.ones(width) * 0.3, size=4)),
    ]
    for scores in batches:
        valid = torch.from_numpy(rng.random(scores.shape) < rng.uniform(0.02, 1.0, size=(scores.shape[0], 1)))
        valid[0] = True  # a full row beside masked ones
        for mask in (None, valid):
            kernel = local_outlier_factors(scores, k, mask, torch.float64)
            monkeypatch.setattr(lof, "USE_CPU_KERNEL", False)
            reference = local_outlier_factors(scores, k, mask, torch.float64)
            monkeypatch.undo()
            torch.testing.assert_close(kernel, reference, rtol=0, atol=0, equal_nan=True)


def test_without_numba_the_torch_form_gives_the_labels(monkeypatch):
    """An install without numba (no ``fast`` extra): ``cpu_kernel()`` says so and LOF runs its torch form."""
    import vtc.methods

    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.dirichlet(np.ones(200) * 0.3, size=3))
    expected = lof.lof_outliers(scores, 20)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "vtc.methods.lof_cpu", raising=False)
    monkeypatch.delattr(vtc.methods, "lof_cpu", raising=False)
    monkeypatch.setattr(lof, "_CPU_KERNEL", None)
    assert lof.cpu_kernel() is None
    assert torch.equal(lof.lof_outliers(scores, 20), expected)
