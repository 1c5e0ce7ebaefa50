"""The ``jaxpull`` command line: a thin shell over the library.

Every failure a user can cause prints one line, ``jaxpull: error: ...``, and exits with 2;
nothing is left half-written (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np


def _convert(args: argparse.Namespace) -> int:
    try:
        import jaxpull_convert
    except ImportError as e:
        raise RuntimeError(
            f"conversion needs torch and torchvision ({e}): pip install 'jaxpull[convert]'"
        ) from None
    meta = jaxpull_convert.convert(
        args.arch, args.output, weights=args.weights, state_dict=args.state_dict, image_size=args.image_size
    )
    print(
        f"wrote {args.output}: {args.arch} from {meta['source']}; "
        f"max |logit error| vs torch {meta['parity_max_abs']} (relative {meta['parity_max_rel']})"
    )
    return 0


def _check_output(path: str, suffix: str) -> Path:
    """Fail before any compute if ``path`` cannot be written."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ValueError(f"output {path!r} must end in {suffix}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output directory {str(parent)!r} is not writable: choose another path")
    return out


def resolve_targets(model, logits: np.ndarray, spec: str) -> np.ndarray:
    """``"0,goldfish,top3"`` -> int ``(N, K)``: indices, class names, or each image's top-n labels."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--targets is empty: give labels such as 0,goldfish,top3")
    columns = []
    order = np.argsort(-logits, axis=1)
    for item in items:
        if item.lower().startswith("top") and item[3:].isdigit():
            n = int(item[3:])
            if not 1 <= n <= model.num_classes:
                raise ValueError(f"--targets {item}: n must be in [1, {model.num_classes}]")
            columns.extend(order[:, i] for i in range(n))
        else:
            columns.append(np.full(len(logits), model.label(item)))
    return np.stack(columns, axis=1).astype(np.int32)


def print_top5(model, names, logits: np.ndarray) -> None:
    """Print each image's top-5 labels with probabilities."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for name, p in zip(names, probs):
        top = np.argsort(-p)[:5]
        print(f"{name}: " + "; ".join(f"{model.class_name(i)} ({i}) {p[i]:.1%}" for i in top))


def run_explanations(model, x, targets, methods, options, progress=True):
    """Ascent diffs ``(N, K, H, W, 3)`` per method, one image at a time (bounded memory)."""
    import jaxpull
    from tqdm import tqdm

    options = dict(options)  # the caller's options stay as given (they are also saved with the arrays)
    temperatures = {"pullback": options.pop("temperature"), "vanilla": None}
    results = {m: np.zeros(targets.shape + x.shape[1:], np.float32) for m in methods}
    jobs = [(m, i) for m in methods for i in range(len(x))]
    for m, i in tqdm(jobs, desc="explaining", unit="image", disable=not progress or len(jobs) < 2):
        opts = dict(options)
        if m == "vanilla":
            opts.pop("pool_temperature", None)
        results[m][i] = np.asarray(
            jaxpull.ascent(model, x[i : i + 1], targets[i : i + 1], temperature=temperatures[m], output="diff", **opts)
        )[0]
    return results


HEADINGS = {"pullback": "excitation pullback (PGA, x_K - x_0)", "vanilla": "vanilla gradient (PGA, x_K - x_0)"}


def write_outputs(model, names, x, targets, results, out, arrays_path, options) -> None:
    """The figure, and optionally the raw arrays (both written atomically)."""
    from jaxpull import figures
    from jaxpull.io import save_arrays

    titles = [[figures.short_name(model.class_name(int(t))) for t in row] for row in targets]
    panels = {HEADINGS[m]: d for m, d in results.items()}
    figures.explanation_figure(x, panels, titles, out)
    print(f"wrote {out}")
    if arrays_path:
        arrays = {f"{m}_diff": d for m, d in results.items()}
        meta = {k: np.asarray(v if v is not None else np.nan) for k, v in options.items() if not isinstance(v, str)}
        save_arrays(arrays_path, dict(images=x, targets=targets, image_names=np.array(names), **arrays, **meta))
        print(f"wrote {arrays_path}")


def _ascent_options(args) -> dict:
    return dict(steps=args.steps, alpha=args.alpha, eps=None if args.eps <= 0 else args.eps,
                temperature=args.temperature, pool_temperature=args.pool_temperature, gate=args.gate,
                pool_weights=args.pool_weights)


def _explain(args: argparse.Namespace) -> int:
    from jaxpull import images, store

    out = _check_output(args.output, ".png")
    arrays = _check_output(args.save_arrays, ".npz") if args.save_arrays else None
    x = images.load_images(args.images)
    model = store.resolve(args.model)
    methods = ["pullback", "vanilla"] if args.method == "both" else [args.method]
    options = _ascent_options(args)
    import jaxpull  # validate the options before the long computation

    jaxpull.make_gating(options["temperature"], options["pool_temperature"], options["gate"], options["pool_weights"])
    logits = np.asarray(model(x))
    targets = resolve_targets(model, logits, args.targets)
    names = [Path(p).stem for p in args.images]
    print_top5(model, names, logits)
    results = run_explanations(model, x, targets, methods, options)
    write_outputs(model, names, x, targets, results, out, arrays, options)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jaxpull import images, store

    out = _check_output(args.output, ".png")
    paths = images.sample_paths()
    names = [p.stem for p in paths]
    x = images.load_images(paths)
    model = store.resolve(args.model)
    logits = np.asarray(model(x))
    print(f"model {model.arch} ({model.metadata.get('source', 'unknown source')})")
    print_top5(model, names, logits)
    # The paper's layout: one column per image's own top-1 label (the diagonal), so every
    # other cell of that column is a counterfactual, plus one random label.
    own = list(dict.fromkeys(int(i) for i in logits.argmax(1)))
    rng = np.random.default_rng(args.seed)
    extra = int(rng.choice([c for c in range(model.num_classes) if c not in own]))
    targets = np.tile(np.array(own + [extra], np.int32), (len(x), 1))
    options = dict(steps=5, alpha=20.0, eps=100.0, temperature=0.3, pool_temperature=None, gate="sigmoid",
                   pool_weights="soft")
    results = run_explanations(model, x, targets, ["pullback", "vanilla"], options)
    write_outputs(model, names, x, targets, results, out, None, options)
    return 0


def parse_labels(spec: str, model) -> list:
    """``"all"``, ``"0-99"``, or a comma list of indices / class names / ranges."""
    if spec.strip().lower() == "all":
        return list(range(model.num_classes))
    labels = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        lo, sep, hi = item.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            labels.extend(range(model.label(lo), model.label(hi) + 1))
        else:
            labels.append(model.label(item))
    if not labels:
        raise ValueError("--labels is empty: give all, a range such as 0-99, or a list")
    return labels


def parse_bytes(text: str) -> float:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes."""
    t = text.strip().upper().replace("IB", "B")
    for suffix, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], scale
            break
    else:
        factor = 1
    try:
        return float(t) * factor
    except ValueError:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 2GB or 512MB") from None


def _sweep(args: argparse.Namespace) -> int:
    from jaxpull import images, store, sweep

    x = images.load_images(args.images)
    model = store.resolve(args.model)
    labels = parse_labels(args.labels, model)
    temperatures = [None if t.strip().lower() in ("none", "vanilla") else float(t) for t in args.temperatures.split(",")]
    extra = dict(steps=args.steps, alpha=args.alpha) if args.method == "ascent" else {}
    result = sweep.sweep(model, x, labels, temperatures, method=args.method, reduce=args.reduce, out=args.out,
                         memory_budget=parse_bytes(args.memory_budget), chunk_size=args.chunk_size, **extra)
    print(f"wrote {', '.join(f'{k}.npy {tuple(v.shape)}' for k, v in result.items() if k != 'top_labels')} to {args.out}")
    if "top_labels" in result:
        for name, row in zip(args.images, result["top_labels"]):
            for t, top in zip(temperatures, row):
                print(f"{Path(name).stem} t={t}: most aligned labels " + ", ".join(model.class_name(int(i)) for i in top[:5]))
    return 0


def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _evaluate(args: argparse.Namespace) -> int:
    from jaxpull import evaluate, images, io, store

    out = _check_output(args.output, ".md")
    csv_path = out.with_suffix(".csv")
    names, metric_names = _split(args.explainers), _split(args.metrics)
    for flag in ("limit", "mosaics", "stages", "samples", "resamples", "sensitivity_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.temperature is not None:
        from jaxpull import checks

        checks.positive(args.temperature, "--temperature")
    if args.images == ["samples"]:
        found = images.evaluation_photos()
        if len(found) < 3:
            raise ValueError("too few offline photos found: pip install matplotlib scikit-image (or 'jaxpull[demo]')")
        paths, classes = list(found.values()), None
    else:
        paths, classes = evaluate.find_images(args.images, args.limit)
    model = store.resolve(args.model)
    evaluate.check_request(model, names, metric_names, len(paths))
    options = {}
    if args.temperature is not None:
        options.update({n: {"temperature": args.temperature} for n in names if "pullback" in n})
    if args.samples is not None:
        options.update({n: {**options.get(n, {}), "samples": args.samples} for n in names if n.startswith("smoothgrad")})
    labels = None
    if args.labels == "folders":
        if classes is None:
            raise ValueError("--labels folders needs one folder of class subfolders (ImageNet style) as --images")
        labels = classes
    elif args.labels != "top1":
        labels = [model.label(l) for l in _split(args.labels)]
    x = images.load_images(paths)
    if labels is None:
        labels = evaluate.top1(model, x)  # once, here: evaluate() uses these, and mosaics default to them
    if "focus" in metric_names:
        distinct = len(set(classes if classes is not None else labels))
        if distinct < 3:
            raise ValueError(f"Focus mosaics need images of at least 3 distinct classes, these have {distinct}: add images")
    report = evaluate.evaluate(model, x, labels, classes, explainer_names=names, metric_names=metric_names,
                               options=options, mosaics=args.mosaics, stages=args.stages,
                               sensitivity_samples=args.sensitivity_samples, seed=args.seed)
    report.settings["images_used"] = [Path(p).name for p in paths]
    rows = evaluate.summary_rows(report, args.resamples)
    command = "jaxpull " + " ".join(shlex.quote(a) for a in args.argv)
    text = evaluate.to_markdown(report, rows, command)
    text += "\nImages: " + ", ".join(report.settings["images_used"]) + "\n"
    io.atomic_write(csv_path, lambda tmp: Path(tmp).write_text(evaluate.to_csv(rows)))
    io.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {out} and {csv_path}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from jaxpull import app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port: use 1-65535")
    app.serve(args.host, args.port, args.models)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="jaxpull", description="Excitation pullbacks for ReLU networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert torchvision weights to a jaxpull .safetensors file")
    p.add_argument("arch", help="torchvision architecture name, e.g. resnet50")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V1 or DEFAULT (downloads)")
    src.add_argument("--state-dict", help="a local state_dict file (.pth), loaded with weights_only=True")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--image-size", type=int, default=224, help="input size of the parity check (default 224)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("explain", help="explain images: the paper's figure of ascent differences")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--model", default="efficientnet_lite0", help="a .safetensors file or a cached model name")
    p.add_argument("--targets", default="top3", help="comma-separated indices, class names or topN (default top3)")
    p.add_argument("--method", choices=["pullback", "vanilla", "both"], default="both")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--alpha", type=float, default=20.0)
    p.add_argument("--eps", type=float, default=100.0, help="L2 ball radius; 0 for no projection")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--pool-temperature", type=float, default=None)
    p.add_argument("--gate", choices=["sigmoid", "normal_cdf"], default="sigmoid")
    p.add_argument("--pool-weights", choices=["soft", "detached"], default="soft")
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.add_argument("--save-arrays", help="also write the raw results to this .npz")
    p.set_defaults(run=_explain)

    p = sub.add_parser("demo", help="the embedded default: EfficientNet-Lite0 on real photos, offline")
    p.add_argument("--model", default="efficientnet_lite0", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default="jaxpull_demo.png", help="output .png (default jaxpull_demo.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random extra label")
    p.set_defaults(run=_demo)

    p = sub.add_parser("sweep", help="images x labels x temperatures, chunked in a memory budget, to .npy files")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--labels", default="all", help="all, a range 0-99, or a comma list (default all)")
    p.add_argument("--temperatures", default="0.3", help="comma list; 'none' for vanilla (default 0.3)")
    p.add_argument("--method", choices=["pullback", "ascent"], default="pullback")
    p.add_argument("--reduce", choices=["maps", "norms", "alignment"], default="alignment")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--alpha", type=float, default=20.0)
    p.add_argument("--memory-budget", default="2GB", help="device memory per chunk (default 2GB)")
    p.add_argument("--chunk-size", type=int, default=None, help="labels per chunk (overrides the budget)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds the same sweep)")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("evaluate", help="score explainers with faithfulness metrics; markdown + CSV report")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, a folder, an ImageNet-style folder of class subfolders, or 'samples' (offline photos)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--explainers", default=",".join(("pullback", "pullback_ascent", "gradient", "gradient_ascent")),
                   help="comma list (default pullback,pullback_ascent,gradient,gradient_ascent)")
    p.add_argument("--metrics", default="focus,faithfulness,infidelity", help="comma list (default focus,faithfulness,infidelity)")
    p.add_argument("--labels", default="top1", help="top1 (default), folders (ImageNet-style folder), or one label per image")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (classes in turn)")
    p.add_argument("--mosaics", type=int, default=50, help="number of Focus mosaics (default 50)")
    p.add_argument("--stages", type=int, default=6, help="cascading randomisation steps (default 6)")
    p.add_argument("--sensitivity-samples", type=int, default=10, help="max-sensitivity perturbations per image (default 10)")
    p.add_argument("--temperature", type=float, default=None, help="temperature of the pullback explainers (default 0.3)")
    p.add_argument("--samples", type=int, default=None, help="SmoothGrad samples (default 50)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output .md (a .csv is written beside it)")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("app", help="the interactive explorer in the browser (needs 'jaxpull[app]')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models", default=None, help="folder of converted .safetensors files to offer")
    p.set_defaults(run=_app)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``jaxpull`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("jaxpull: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"jaxpull: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
