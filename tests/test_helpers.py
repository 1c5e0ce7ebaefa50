"""The parity tests' measuring stick (``map_errors``), checked by hand: a wrong measure would make
every parity test pass or fail for the wrong reason."""

from __future__ import annotations

import numpy as np

from helpers import COSINE_MIN, REL_ERR_MAX, map_errors


def test_map_errors_by_hand():
    ref = np.zeros((1, 3, 2, 2), np.float32)
    ref[0, 0] = [[1, 0], [0, 0]]
    ref[0, 1] = [[0, 2], [0, 0]]  # map 2 is zero in both: a logit zeroed by a final ReLU
    got = ref.copy()
    got[0, 1] = [[0, 2], [0.02, 0]]
    cos, rel = map_errors(got, ref)
    np.testing.assert_allclose(cos, 2 / np.hypot(2, 0.02), rtol=1e-9)  # the worst map's cosine
    np.testing.assert_allclose(rel, 0.02 / 2, rtol=1e-6)  # largest error / largest reference value
    assert map_errors(ref, ref) == (1.0, 0.0)  # both-zero maps agree exactly
    got[0, 2, 0, 0] = 1e-9  # a zero reference map against a nonzero one: no cosine, fails any bound
    cos, rel = map_errors(got, ref)
    assert np.isnan(cos) and not (cos > COSINE_MIN and rel < REL_ERR_MAX)
