"""The paper's evaluation protocol through jaxpull and through the paper's pipeline, timed.

The same model (torchvision's MobileNetV2 with its ImageNet weights, from the offline package;
or ``--model efficientnet_lite0``), the same images (the offline photos), the same explainers and
the same seven metrics of ``jaxpull evaluate --protocol paper``:

* jaxpull: :func:`jaxpull.evaluation.pipeline.run_evaluation` once from cold (compiling
  included: what a user waits for), then every explainer and every metric again, timed alone
  (compiled: the steady state, what a larger run costs per image).
* the paper's pipeline, as a minimal harness written here (not the paper's code): the torch
  model, the pullback explainers as the torch model with jaxpull's rules swapped in
  (``jaxpull_convert.torch_reference.gated``, the role of the paper's ``PullbackWrapper``),
  Captum through ``quantus.explain`` (Gradient, IntegratedGradients: 10 trapezoid steps),
  SmoothGrad as the paper's loop of Captum ``Saliency`` calls, the ascent as a loop of normalised
  gradient steps; Quantus 0.6.0's FaithfulnessEstimate, MonotonicityCorrelation, MaxSensitivity,
  RandomLogit and Focus, and the paper's two metrics of its own (its optimal-scaling Infidelity
  and Faithfulness Correlation over patches) restated here as Quantus subclasses from their
  definition.

The explainers are those both sides run here (the paper's names; jaxpull's IntegratedGradients
is Captum's, 10 trapezoid steps, as Quantus calls it). The paper's settings at 224 pixels throughout, with ``--samples`` noisy copies
for the SmoothGrad explainers (the paper: 50) and ``--mosaics`` Focus mosaics.

Usage (a few minutes on a 2-core CPU; do not run it beside other heavy work)::

    python benchmarks/bench_evaluation.py --images 4 --samples 10 --mosaics 4
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxpull.evaluation.protocol import PAPER

PAPER_METRICS = PAPER.default_metrics
EXPLAINERS = ("Gradient", "SoftPullback", "SmoothGrad", "SmoothPullback", "IntegratedGradients", "PullbackAscent")


# --------------------------------------------------------------------------------------
# The torch side: a minimal harness of the paper's pipeline
# --------------------------------------------------------------------------------------


def torch_side(arch: str):
    """(torch model taking [-1, 1] NCHW images, its gated copy under the semantic rules)."""
    import torch

    from jaxpull_convert import sources, torch_reference as R

    _, tensors, _, _ = sources.from_weights_name(arch, "DEFAULT")
    tm = sources.torch_model(arch, tensors, 1000)
    mean = torch.tensor(sources.input_mean(arch)).view(1, 3, 1, 1)
    std = torch.tensor(sources.input_std(arch)).view(1, 3, 1, 1)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(((x + 1) / 2 - mean) / std)

    return Wrapped(tm).eval(), Wrapped(R.gated(copy.deepcopy(tm), rules="semantic")).eval()


def torch_explainers(model, gated, samples: int) -> dict[str, Callable]:
    """Quantus' explain functions ``(model, inputs NCHW, targets) -> NCHW``; the model argument is
    ignored: each is bound to its model (the gated copy for a pullback, as the paper's wrapper)."""
    import quantus
    import torch
    from captum.attr import Saliency

    def captum(m, method):
        return lambda model, inputs, targets, **kw: quantus.explain(
            m, inputs, targets, method=method, reduce_axes=(), device="cpu"
        )

    def smooth(m):
        def run(model, inputs, targets, **kw):
            x, y = torch.as_tensor(inputs), torch.as_tensor(targets).long()
            total = torch.zeros_like(x)
            for _ in range(samples):
                total += Saliency(m).attribute(x + 0.15 * torch.randn_like(x), target=y, abs=False).detach()
            return (total / samples).numpy()

        return run

    def ascent(m, steps=5, alpha=20.0):
        def run(model, inputs, targets, **kw):
            x0 = torch.as_tensor(inputs)
            y = torch.as_tensor(targets).long()
            xs = x0.clone()
            for _ in range(steps):
                xs = xs.detach().requires_grad_(True)
                m(xs).gather(1, y[:, None]).sum().backward()
                g = xs.grad
                xs = xs + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            return (xs - x0).detach().numpy()

        return run

    return {
        "Gradient": captum(model, "Gradient"),
        "SoftPullback": captum(gated, "Gradient"),
        "SmoothGrad": smooth(model),
        "SmoothPullback": smooth(gated),
        "IntegratedGradients": captum(model, "IntegratedGradients"),
        "PullbackAscent": ascent(gated),
    }


def torch_metrics(settings) -> dict[str, object]:
    """Quantus 0.6.0's metrics with the paper's settings, and its two metrics of its own restated."""
    import quantus

    from jaxpull_convert.quantus_reference import UNIFORM as uniform, paper_correlation, paper_infidelity

    quiet = dict(disable_warnings=True, display_progressbar=False)

    s = settings
    return {
        "infidelity": paper_infidelity(
            n_perturb_samples=s["infidelity"]["samples"],
            perturb_patch_sizes=list(s["infidelity"]["patch_sizes"]),
            **quiet,
        ),
        "faithfulness_correlation": paper_correlation(
            perturb_patch_sizes=list(s["faithfulness_correlation"]["patch_sizes"]),
            abs=True,
            **quiet,
        ),
        "faithfulness_estimate": quantus.FaithfulnessEstimate(
            features_in_step=s["faithfulness_estimate"]["features_in_step"], perturb_baseline=0.0, abs=True, **quiet
        ),
        "monotonicity_correlation": quantus.MonotonicityCorrelation(
            nr_samples=s["monotonicity_correlation"]["samples"],
            features_in_step=s["monotonicity_correlation"]["features_in_step"],
            perturb_baseline="uniform",
            perturb_func_kwargs=uniform,
            abs=True,
            eps=1e-12,
            **quiet,
        ),
        "max_sensitivity": quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02, **quiet),
        "random_logit": quantus.RandomLogit(
            num_classes=1000, seed=42, similarity_func=quantus.similarity_func.correlation_pearson, **quiet
        ),
        "focus": quantus.Focus(abs=False, normalise=False, return_aggregate=False, **quiet),
    }


def nchw(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def timed(fn) -> tuple:
    start = time.perf_counter()
    out = fn()
    if isinstance(out, jax.Array):
        out.block_until_ready()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=4, help="offline photos (default 4)")
    parser.add_argument("--samples", type=int, default=10, help="SmoothGrad / SmoothPullback samples (default 10)")
    parser.add_argument("--mosaics", type=int, default=4, help="Focus mosaics (default 4)")
    parser.add_argument("--explainers", default=",".join(EXPLAINERS))
    parser.add_argument("--metrics", default=",".join(PAPER_METRICS))
    args = parser.parse_args(argv)

    import torch

    from jaxpull.evaluation import explainers, pipeline, protocol as protocols
    from jaxpull.evaluation.imagesource import ArraySource
    from jaxpull.files import cache, images

    torch.manual_seed(0)
    names: list[str] = args.explainers.split(",")
    metric_names: list[str] = args.metrics.split(",")
    model = cache.resolve(args.model, log=lambda m: None)
    photos = list(images.evaluation_photos().values())[: args.images]
    x = images.load_images(photos, **model.preprocessing.image_options)
    labels = np.asarray(np.argmax(np.asarray(model(x)), -1))
    settings = protocols.paper_settings(224, 224, 1000)
    options = {"SmoothGrad": {"samples": args.samples}, "SmoothPullback": {"samples": args.samples}}
    specs = []
    for n in names:
        explainers.get(n)  # ValueError listing the choices
        specs.append(protocols.ExplainerSpec(n, options.get(n, {})))
    print(
        f"{args.model}, {len(x)} photos at 224 px (top-1 {labels.tolist()}), {args.mosaics} mosaics, "
        f"SmoothGrad samples {args.samples}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True,
    )

    # jaxpull from cold: the whole table, compiling included
    start = time.perf_counter()
    report = pipeline.run_evaluation(
        model,
        ArraySource(x),
        labels,
        specs,
        protocol="paper",
        metric_names=metric_names,
        mosaics=args.mosaics,
        batch=len(x),
        progress=False,
    )
    cold = time.perf_counter() - start
    print(f"jaxpull end to end, cold (compiling included): {cold:.1f} s", flush=True)

    # jaxpull again, piece by piece (compiled)
    proto = protocols.PAPER
    focus = settings["focus"]
    plan = protocols.plan_mosaics(proto, labels, args.mosaics, proto.seed, focus)
    mosaic_x = protocols.build_mosaics(proto, ArraySource(x), plan, slice(0, args.mosaics), focus)
    jx_explain, jx_metric = {}, {m: 0.0 for m in metric_names}
    jx_maps = {}
    for spec in specs:
        fn = spec.map_function(model)
        fn(x, labels)  # compiled already by the cold run; once more for the padding-free shape
        jx_maps[spec.label], jx_explain[spec.label] = timed(lambda fn=fn: fn(x, labels))
        for m in metric_names:
            on_mosaics = proto.metrics[m].on == "mosaics"
            xs, ls = (mosaic_x, plan.targets) if on_mosaics else (x, labels)
            key, seed = protocols.metric_key(proto.seed, m, 0)

            def score(fn=fn, xs=xs, ls=ls, on_mosaics=on_mosaics, spec=spec, key=key, seed=seed, m=m):
                maps = fn(xs, ls) if on_mosaics else jx_maps[spec.label]
                b = protocols.Batch(model, xs, ls, maps, fn, spec.model_function(), key, seed, plan.quadrants)
                return proto.metrics[m].score(b, **settings[m])

            score()
            jx_metric[m] += timed(score)[1]

    # the paper's pipeline
    tmodel, gated = torch_side(args.model)
    t_explain_fns = torch_explainers(tmodel, gated, args.samples)
    t_metrics = torch_metrics(settings)
    xt, mosaic_t = nchw(x), nchw(mosaic_x)
    for warm in ("Gradient", "SoftPullback"):  # torch's first backward pass sets itself up: not counted
        t_explain_fns[warm](tmodel, xt, labels)
    t_explain, t_metric = {}, {m: 0.0 for m in metric_names}
    for n in names:
        explain = t_explain_fns[n]
        a, t_explain[n] = timed(lambda explain=explain: explain(tmodel, xt, labels))
        for m in metric_names:
            metric = t_metrics[m]
            if m == "focus":
                run = lambda metric=metric, explain=explain: metric(
                    model=tmodel,
                    x_batch=mosaic_t,
                    y_batch=plan.targets,
                    a_batch=mosaic_t * explain(tmodel, mosaic_t, plan.targets),
                    custom_batch=plan.quadrants.astype(int),
                    channel_first=True,
                    device="cpu",
                )
            else:
                run = lambda metric=metric, explain=explain, a=a: metric(
                    model=tmodel,
                    x_batch=xt,
                    y_batch=labels,
                    a_batch=a,
                    channel_first=True,
                    device="cpu",
                    explain_func=explain,
                    batch_size=len(xt),
                )
            t_metric[m] += timed(run)[1]
        print(f"torch: {n} done", flush=True)

    jx_total = sum(jx_explain.values()) + sum(jx_metric.values())
    t_total = sum(t_explain.values()) + sum(t_metric.values())
    print("\n| explainer (maps of the photos) | torch + Captum (s) | jaxpull (s) | ratio |")
    print("|---|---|---|---|")
    for spec, n in zip(specs, names, strict=True):
        print(
            f"| {n} ({spec.label}) | {t_explain[n]:.2f} | {jx_explain[spec.label]:.3f} | "
            f"{t_explain[n] / jx_explain[spec.label]:.1f}x |"
        )
    print("\n| metric (summed over the explainers) | Quantus (s) | jaxpull (s) | ratio |")
    print("|---|---|---|---|")
    for m in metric_names:
        print(f"| {m} | {t_metric[m]:.2f} | {jx_metric[m]:.3f} | {t_metric[m] / jx_metric[m]:.1f}x |")
    print(
        f"\nEnd to end: torch + Captum + Quantus {t_total:.1f} s; jaxpull {jx_total:.2f} s compiled "
        f"({t_total / jx_total:.1f}x), {cold:.1f} s from cold with compiling ({t_total / cold:.1f}x)"
    )
    assert set(report.scores) == set(metric_names)


if __name__ == "__main__":
    main()
