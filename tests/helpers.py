"""Comparison helpers with the tolerances the tests state."""

from __future__ import annotations

import numpy as np

# Pullbacks and gradients: every map's cosine similarity to the reference, and the largest
# absolute error relative to the reference's largest magnitude (float32 throughout).
COSINE_MIN = 0.9999
REL_ERR_MAX = 1e-3
# Logits: max |jax - torch| <= LOGIT_REL * max(1, max |torch|), as the converter checks.
LOGIT_REL = 1e-4


def as_np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def map_errors(got, ref):
    """(min cosine over maps, max abs error / max |ref|) for ``(N, K, ...)`` stacks of maps."""
    got, ref = as_np(got), as_np(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    g = got.reshape(got.shape[0] * got.shape[1], -1).astype(np.float64)
    r = ref.reshape(g.shape).astype(np.float64)
    cos = np.sum(g * r, 1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1))
    return float(cos.min()), float(np.abs(g - r).max() / np.abs(r).max())


def assert_maps_close(got, ref, cos_min=COSINE_MIN, rel_max=REL_ERR_MAX):
    cos, rel = map_errors(got, ref)
    assert cos > cos_min and rel < rel_max, f"cosine {cos:.7f} (min {cos_min}), rel err {rel:.2e} (max {rel_max})"


def assert_logits_close(got, ref, rel=LOGIT_REL):
    got, ref = as_np(got), as_np(ref)
    err = np.abs(got - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max |logit error| {err:.3g}"
