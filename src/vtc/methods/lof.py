"""TEMPORARY stand-in (scikit-learn per row) until the batched torch LOF (branch `lof`) lands; same API."""
import warnings
import torch
from sklearn.neighbors import LocalOutlierFactor


def lof_outlier_counts(scores, n_neighbors, valid=None, dtype=torch.float64):
    out = []
    for b in range(scores.shape[0]):
        row = scores[b] if valid is None else scores[b][valid[b]]
        n = row.numel()
        if n < 3:
            out.append(0)
            continue
        lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, n - 1), contamination="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            labels = lof.fit_predict(row.detach().to(dtype).cpu().numpy().reshape(-1, 1))
        out.append(int((labels == -1).sum()))
    return torch.tensor(out, dtype=torch.long)
