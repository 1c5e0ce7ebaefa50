"""The paper's two metrics of its own as Quantus 0.6.0 subclasses: the references jaxpull's
``jaxpull.evaluation.faithfulness`` is tested against (``tests/test_metrics_quantus.py``) and timed
against (``benchmarks/bench_evaluation.py``).

Restated from their description in the paper's code (``lib/metrics.py``), not copied. Needs quantus
(the ``test`` extra).
"""

from __future__ import annotations

import numpy as np

UNIFORM = {"uniform_low": -1.0, "uniform_high": 1.0}  # the paper's uniform baseline in [-1, 1]


def _quiet(kwargs: dict) -> dict:
    return {"disable_warnings": True, **kwargs}


def _predict(model, x_batch):
    return lambda z: model.predict(model.shape_input(z, x_batch.shape, channel_first=True, batched=True))


def paper_infidelity(**kwargs):
    """The paper's InfidelityOptimalScaling: Quantus' Infidelity loop (per sample and patch size,
    cumulative patch perturbations by ``perturb_func``, a uniform baseline in [-1, 1]) scored by the
    least-squares optimal scaling of <a, x - x'> against the logit drop. ``kwargs``: Quantus'
    (``n_perturb_samples``, ``perturb_patch_sizes``, ...)."""
    import quantus
    from quantus.helpers import utils

    class InfidelityOptimalScaling(quantus.Infidelity):
        def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
            b = a_batch.shape[0]
            a_flat = np.broadcast_to(a_batch, x_batch.shape).reshape(b, -1)
            predict = _predict(model, x_batch)
            y = predict(x_batch)[np.arange(b), y_batch]
            a2, ab, b2, count = np.zeros(b), np.zeros(b), np.zeros(b), 0
            for _ in range(self.n_perturb_samples):
                for p in self.perturb_patch_sizes:
                    xp = x_batch.copy()
                    for idx in utils.get_block_indices(xp, p):  # sizes divisible by p: no padding
                        xp = self.perturb_func(arr=xp.reshape(b, -1), indices=idx).reshape(x_batch.shape)
                        drop = y - predict(xp)[np.arange(b), y_batch]
                        dot = np.sum(a_flat * (x_batch - xp).reshape(b, -1), axis=-1)
                        a2, ab, b2, count = a2 + dot**2, ab + dot * drop, b2 + drop**2, count + 1
            beta = ab / np.where(a2 != 0, a2, 1.0)
            return (beta**2 * a2 - 2 * beta * ab + b2) / count

    return InfidelityOptimalScaling(perturb_baseline="uniform", perturb_func_kwargs=UNIFORM, **_quiet(kwargs))


def paper_correlation(**kwargs):
    """The paper's FaithfulnessCorrelationPatches: every patch of the edge-padded grid set to the
    baseline (0); Pearson over the patches, of the padded map's sums and the logit drops.
    ``kwargs``: Quantus' (``perturb_patch_sizes``, ``abs``, ...)."""
    import quantus
    from quantus.helpers import utils

    class FaithfulnessCorrelationPatches(quantus.FaithfulnessCorrelation):
        def __init__(self, perturb_patch_sizes=(56,), **kwargs):
            super().__init__(**kwargs)
            self.perturb_patch_sizes = perturb_patch_sizes

        def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
            b = a_batch.shape[0]
            predict = _predict(model, x_batch)
            y = predict(x_batch)[np.arange(b), y_batch]
            drops, sums = [], []
            for p in self.perturb_patch_sizes:
                ph, pw = utils.get_padding_size(x_batch.shape[2], p), utils.get_padding_size(x_batch.shape[3], p)
                pad = ((0, 0), (0, 0), ph, pw)
                xpad = utils._pad_array(x_batch, pad, mode="edge", padded_axes=np.arange(4))
                apad = utils._pad_array(a_batch, pad, mode="edge", padded_axes=np.arange(4))
                for idx in utils.get_block_indices(xpad, p):
                    xp = self.perturb_func(arr=xpad.reshape(b, -1), indices=idx).reshape(xpad.shape)
                    xp = xp[:, :, ph[0] : xp.shape[2] - ph[1], pw[0] : xp.shape[3] - pw[1]]
                    drops.append(y - predict(xp)[np.arange(b), y_batch])
                    sums.append(apad.reshape(b, -1)[np.arange(b)[:, None], idx].sum(-1))
            return self.similarity_func(a=np.stack(sums, 1), b=np.stack(drops, 1), batched=True).tolist()

    return FaithfulnessCorrelationPatches(perturb_baseline=0.0, return_aggregate=False, subset_size=4, **_quiet(kwargs))
