"""k-means through faiss (fast, multi-threaded), tolerant of fewer points than centroids."""

from __future__ import annotations

import numpy as np
import torch


def kmeans(points: torch.Tensor, clusters: int, *, spherical: bool = False, iterations: int = 20,
           seed: int = 1234) -> torch.Tensor:
    """``clusters`` centroids of ``points`` [n, d] (float32 tensor out).

    With fewer points than clusters the points themselves (plus small random jitter copies)
    serve as centroids, so tiny models and small calibration sets still initialise.
    """
    import faiss

    data = np.ascontiguousarray(points.detach().float().cpu().numpy())
    n, dim = data.shape
    rng = np.random.default_rng(seed)
    if n <= clusters:
        extra = data[rng.integers(0, n, clusters - n)] if n else np.zeros((clusters, dim))
        noise = rng.normal(0, 1e-3 + float(data.std()) * 0.1 if n else 1.0, extra.shape)
        centroids: np.ndarray = np.concatenate([data, extra + noise]).astype(np.float32)
    else:
        km = faiss.Kmeans(dim, clusters, niter=iterations, seed=seed, spherical=spherical,
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=256)
        km.train(data)
        assert km.centroids is not None
        centroids = km.centroids
    out = torch.from_numpy(np.asarray(centroids, dtype=np.float32).copy())
    if spherical:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out
