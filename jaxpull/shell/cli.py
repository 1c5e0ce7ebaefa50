"""The ``jaxpull`` command line: a thin shell over the library.

Every failure a user can cause prints one line, ``jaxpull: error: ...``, and exits with 2;
nothing is left half-written (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from jaxpull.core.settings import DEFAULT_RULES, FROM_RULES, PRESETS

DEFAULT_MODEL = "mobilenet_v2"  # jaxpull.files.cache.DEFAULT_MODEL (not imported here: that loads jax)


def _convert(args: argparse.Namespace) -> int:
    try:
        import jaxpull_convert
    except ImportError as e:
        raise RuntimeError(
            f"conversion needs torch and torchvision ({e}): pip install 'jaxpull[convert]'"
        ) from None
    transform_input = None if args.transform_input is None else args.transform_input == "true"
    meta = jaxpull_convert.convert(
        args.arch, args.output, weights=args.weights, state_dict=args.state_dict, image_size=args.image_size,
        transform_input=transform_input,
    )
    print(
        f"wrote {args.output}: {args.arch} from {meta['source']}; "
        f"max |logit error| vs torch {meta['parity_max_abs']} (relative {meta['parity_max_rel']})"
    )
    return 0


def _check_output(path: str, suffix: str) -> Path:
    """Fail before any compute if ``path`` cannot be written (the one check of :func:`jaxpull.files.outputs.check_output`)."""
    from jaxpull.files.outputs import check_output

    return check_output(path, suffix)


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


# the gate settings that have no meaning for the vanilla gradient (``make_gating`` refuses them with temperature None)
VANILLA_DROPS = ("pool_temperature", "gelu_temperature", "silu_temperature", "layer_norm", "attention",
                 "attention_temperature")


def run_explanations(model, x, targets, methods, options, progress=True):
    """Ascent diffs ``(N, K, H, W, 3)`` per method, one image at a time (bounded memory)."""
    import jaxpull
    from tqdm import tqdm

    options = dict(options)  # the caller's options stay as given (they are also saved with the arrays)
    temperatures = {"pullback": options.pop("temperature", FROM_RULES), "vanilla": None}
    results = {m: np.zeros(targets.shape + x.shape[1:], np.float32) for m in methods}
    jobs = [(m, i) for m in methods for i in range(len(x))]
    for m, i in tqdm(jobs, desc="explaining", unit="image", disable=not progress or len(jobs) < 2):
        opts = dict(options)
        if m == "vanilla":  # the exact gradient: only the ascent options and the names gate / pool_weights remain
            for name in VANILLA_DROPS:
                opts.pop(name, None)
        results[m][i] = np.asarray(
            jaxpull.ascent(model, x[i : i + 1], targets[i : i + 1], temperature=temperatures[m], output="diff", **opts)
        )[0]
    return results


HEADINGS = {"pullback": "excitation pullback (PGA, x_K - x_0)", "vanilla": "vanilla gradient (PGA, x_K - x_0)"}


def write_outputs(model, names, x, targets, results, out, arrays_path, options) -> None:
    """The figure, and optionally the raw arrays (both written atomically)."""
    from jaxpull.shell import figures
    from jaxpull.files.outputs import save_arrays

    titles = [[figures.short_name(model.class_name(int(t))) for t in row] for row in targets]
    panels = {HEADINGS[m]: d for m, d in results.items()}
    figures.explanation_figure(x, panels, titles, out)
    print(f"wrote {out}")
    if arrays_path:
        arrays = {f"{m}_diff": d for m, d in results.items()}
        meta = {k: np.asarray(v if v is not None else np.nan) for k, v in options.items() if not isinstance(v, str)}
        save_arrays(arrays_path, dict(images=x, targets=targets, image_names=np.array(names), **arrays, **meta))
        print(f"wrote {arrays_path}")




def _settings(args) -> tuple:
    """The setting flags given (the others come from ``--rules``), checked by :mod:`jaxpull.core.settings`
    before any work: ``(options for jaxpull.ascent, every resolved value)``."""
    from jaxpull.core import settings

    given = {n: getattr(args, n) for n in settings.ASCENT_SETTINGS + settings.GATE_SETTINGS
             if getattr(args, n, FROM_RULES) is not FROM_RULES}
    gating = settings.make_gating(**{k: v for k, v in given.items() if k in settings.GATE_SETTINGS}, rules=args.rules)
    ascent = settings.make_ascent(**{k: v for k, v in given.items() if k not in settings.GATE_SETTINGS}, rules=args.rules)
    resolved = dict(rules=args.rules, gate=gating.gate, pool_weights=gating.pool_weights,
                    temperature=gating.temperature, pool_temperature=gating.pool_temperature,
                    gelu_temperature=gating.gelu_temperature, silu_temperature=gating.silu_temperature,
                    layer_norm=gating.layer_norm, attention=gating.attention,
                    attention_temperature=gating.attention_temperature,
                    steps=ascent.steps, alpha=ascent.alpha, eps=ascent.eps, margin=ascent.margin)
    return dict(rules=args.rules, **given), resolved


def _note_unused_pool_settings(args, model) -> None:
    """A one-line note on stderr when a pool setting was given for a model without max-pools."""
    from jaxpull.core import models

    flags = [f"--{n.replace('_', '-')}" for n in ("pool_temperature", "pool_weights")
             if getattr(args, n, FROM_RULES) is not FROM_RULES]
    if flags and not models.get(model.arch).max_pools:
        print(f"jaxpull: note: {' and '.join(flags)} has no effect: {model.arch} has no max-pools", file=sys.stderr)


def _explain(args: argparse.Namespace) -> int:
    from jaxpull.files import images, cache

    from jaxpull.core import checks

    if args.method != "vanilla" and args.temperature is not FROM_RULES:  # the CLI's vanilla is --method vanilla
        checks.positive(args.temperature, "--temperature", " (for the vanilla gradient use --method vanilla)")
    options, resolved = _settings(args)  # before any work
    out = _check_output(args.output, ".png")
    arrays = _check_output(args.save_arrays, ".npz") if args.save_arrays else None
    model = cache.resolve(args.model)
    x = images.load_images(args.images, **model.preprocessing.image_options)  # the sizes its weights expect
    _note_unused_pool_settings(args, model)
    methods = ["pullback", "vanilla"] if args.method == "both" else [args.method]
    logits = np.asarray(model(x))
    targets = resolve_targets(model, logits, args.targets)
    names = [Path(p).stem for p in args.images]
    print_top5(model, names, logits)
    results = run_explanations(model, x, targets, methods, options)
    write_outputs(model, names, x, targets, results, out, arrays, resolved)
    return 0


# The demo's rows per photo: ``jaxpull.ascent`` keywords of each method.
DEMO_METHODS = {
    "excitation": dict(rules="excitation"),
    "semantic": dict(rules="semantic"),
    "vanilla gradient": dict(rules="excitation", temperature=None),
}


def _rules_text(name: str) -> str:
    """One line of a preset's settings, read from :data:`jaxpull.core.settings.PRESETS`."""
    r = PRESETS[name]
    a = r.ascent
    tp = r.temperature if r.pool_temperature is None else r.pool_temperature
    gate = {"sigmoid": "sigmoid", "normal_cdf": "normal-CDF"}.get(r.gate, r.gate)
    ball = f"L2 ball eps {a.eps:g}" if a.project else "no L2 ball"
    return f"{gate} gate t {r.temperature:g}, {r.pool_weights} max-pool weights tp {tp:g}, {ball}, " + (
        "clamp to [-1, 1] after every step" if a.clip else "no clamping")


def demo_caption(model_name: str, max_pools: bool = True) -> str:
    """What the demo figure shows and with which settings."""
    a = PRESETS["excitation"].ascent
    pools = "" if max_pools else " (it has no max-pools, so the max-pool settings play no part)"
    return (
        f"Each cell is x_K - x_0: how {a.steps} steps of projected gradient ascent (step {a.alpha:g} in the L2 norm) "
        "on the column's class logit change the photo x_0, min-max normalised per cell (grey: no change). "
        "The forward pass is exact; only the backward pass differs between rows. Framed: the photo's own top-1 class; "
        f"the other columns are counterfactual classes, the last one random. Model: {model_name}{pools}.\n"
        f"excitation (the paper's first version): {_rules_text('excitation')}.\n"
        f"semantic (its current version): {_rules_text('semantic')}.\n"
        "vanilla gradient: hard gates (the plain gradient), ascent as in excitation."
    )


def _demo(args: argparse.Namespace) -> int:
    import jaxpull
    from tqdm import tqdm

    from jaxpull.shell import figures
    from jaxpull.files import images, cache
    from jaxpull.core import models

    out = _check_output(args.output, ".png")
    _check_seed(args.seed)
    paths = images.sample_paths()
    names = [p.stem for p in paths]
    x = images.load_images(paths)
    model = cache.resolve(args.model)
    logits = np.asarray(model(x))
    print(f"model {model.arch} ({model.metadata.get('source', 'unknown source')})")
    print_top5(model, names, logits)
    # The paper's layout: one column per image's own top-1 label (the diagonal), so every
    # other cell of that column is a counterfactual, plus one random label.
    own = list(dict.fromkeys(int(i) for i in logits.argmax(1)))
    rng = np.random.default_rng(args.seed)
    extra = int(rng.choice([c for c in range(model.num_classes) if c not in own]))
    targets = np.array(own + [extra], np.int32)
    results = {m: np.zeros((len(x), len(targets)) + x.shape[1:], np.float32) for m in DEMO_METHODS}
    jobs = [(m, i) for m in DEMO_METHODS for i in range(len(x))]
    for m, i in tqdm(jobs, desc="explaining", unit="image"):
        diff = jaxpull.ascent(model, x[i : i + 1], targets[None], output="diff", **DEMO_METHODS[m])
        results[m][i] = np.asarray(diff)[0]
    figures.comparison_figure(
        x, results, [figures.short_name(model.class_name(int(t))) for t in targets], names, out,
        own_columns=[own.index(int(i)) for i in logits.argmax(1)],
        title=f"Excitation pullbacks vs the vanilla gradient on {model.arch}",
        caption=demo_caption(f"{model.arch}, weights {model.metadata.get('source', 'unknown').split(' | ')[0]}",
                             models.get(model.arch).max_pools),
    )
    print(f"wrote {out}")
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
    from jaxpull.files import images, cache
    from jaxpull.shell import sweep

    options, _ = _settings(args)  # before any work
    temperatures = FROM_RULES if args.temperatures is FROM_RULES else parse_temperatures(args.temperatures)
    model = cache.resolve(args.model)
    x = images.load_images(args.images, **model.preprocessing.image_options)
    _note_unused_pool_settings(args, model)
    labels = parse_labels(args.labels, model)
    result = sweep.sweep(model, x, labels, temperatures, method=args.method, reduce=args.reduce, out=args.out,
                         memory_budget=parse_bytes(args.memory_budget), chunk_size=args.chunk_size, **options)
    if temperatures is FROM_RULES:
        temperatures = [PRESETS[args.rules].temperature]
    print(f"wrote {', '.join(f'{k}.npy {tuple(v.shape)}' for k, v in result.items())} to {args.out}")
    if "top_labels" in result:
        for name, row in zip(args.images, result["top_labels"]):
            for t, top in zip(temperatures, row):
                print(f"{Path(name).stem} t={t}: most aligned labels " + ", ".join(model.class_name(int(i)) for i in top[:5]))
    return 0


def parse_temperatures(text: str) -> list:
    """``"0.1,0.3,none"`` -> ``[0.1, 0.3, None]`` (``none`` or ``vanilla``: the vanilla gradient)."""
    from jaxpull.core import checks

    temperatures = []
    for item in text.split(","):
        item = item.strip()
        if item.lower() in ("none", "vanilla"):
            temperatures.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--temperatures: {item!r} is not a number: give e.g. 0.1,0.3,none") from None
        checks.positive(value, "--temperatures", " (for the vanilla gradient write none)")
        temperatures.append(value)
    return temperatures


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")


def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _evaluate(args: argparse.Namespace) -> int:
    from jaxpull.evaluation import pipeline
    from jaxpull.files import cache, images, outputs

    out = _check_output(args.output, ".md")
    csv_path = _check_output(str(out.with_suffix(".csv")), ".csv")
    names, metric_names = _split(args.explainers), _split(args.metrics)
    for flag in ("limit", "mosaics", "stages", "samples", "resamples", "sensitivity_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    _check_seed(args.seed)
    from jaxpull.core import checks, settings
    from jaxpull.evaluation import explainers

    if args.temperature is not FROM_RULES:
        checks.positive(args.temperature, "--temperature")
    settings.make_gating(args.temperature, rules=args.rules)
    if args.images == ["samples"]:
        found = images.evaluation_photos()
        if len(found) < 3:
            raise ValueError("too few offline photos found: pip install matplotlib scikit-image (or 'jaxpull[demo]')")
        paths, classes = list(found.values()), None
    else:
        paths, classes = pipeline.find_images(args.images, args.limit)
    model = cache.resolve(args.model)
    pipeline.check_request(model, names, metric_names, len(paths))
    options = {n: {"rules": args.rules} for n in names if n in explainers.TAKE_RULES}
    if args.temperature is not FROM_RULES:
        options.update({n: {**options.get(n, {}), "temperature": args.temperature} for n in names
                        if "pullback" in n.lower()})
    if args.samples is not None:
        options.update({n: {**options.get(n, {}), "samples": args.samples} for n in names
                        if n.startswith("smoothgrad") or n == "SmoothPullback"})
    labels = None
    if args.labels == "folders":
        if classes is None:
            raise ValueError("--labels folders needs one folder of class subfolders (ImageNet style) as --images")
        labels = classes
    elif args.labels != "top1":
        labels = [model.label(name) for name in _split(args.labels)]
    x = images.load_images(paths, **model.preprocessing.image_options)
    if labels is None:
        labels = pipeline.top1(model, x)  # once, here: evaluate() uses these, and mosaics default to them
    if "focus" in metric_names:
        distinct = len(set(classes if classes is not None else labels))
        if distinct < 3:
            raise ValueError(f"Focus mosaics need images of at least 3 distinct classes, these have {distinct}: add images")
    report = pipeline.evaluate(model, x, labels, classes, explainer_names=names, metric_names=metric_names,
                               options=options, mosaics=args.mosaics, stages=args.stages,
                               sensitivity_samples=args.sensitivity_samples, seed=args.seed)
    report.settings["images_used"] = [Path(p).name for p in paths]
    rows = pipeline.summary_rows(report, args.resamples)
    command = "jaxpull " + " ".join(shlex.quote(a) for a in args.argv)
    text = pipeline.to_markdown(report, rows, command)
    text += "\nImages: " + ", ".join(report.settings["images_used"]) + "\n"
    outputs.atomic_write(csv_path, lambda tmp: Path(tmp).write_text(pipeline.to_csv(rows)))
    outputs.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {out} and {csv_path}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from jaxpull.shell import app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port: use 1-65535")
    app.serve(args.host, args.port, args.models)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with jaxpull's one-line errors: ``jaxpull: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"jaxpull: error: {message}\n")


def _number(text: str):
    """A setting flag's value: an int if it is one, else a float (:mod:`jaxpull.core.settings` checks the range)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a number")


def _number_or_none(text: str):
    return None if text.strip().lower() == "none" else _number(text)


def _from_rules(get) -> str:
    """``(default 5)`` when the presets agree, else ``(default from --rules: excitation 0.3, semantic 0.6)``."""
    values = {name: "none" if get(rules) is None else get(rules) for name, rules in PRESETS.items()}
    if len({repr(v) for v in values.values()}) == 1:
        return f"(default {next(iter(values.values()))})"
    return "(default from --rules: " + ", ".join(f"{n} {v}" for n, v in values.items()) + ")"


def _add_settings(p: argparse.ArgumentParser, temperature: bool = True) -> None:
    """The rules preset and the gate / ascent flags, each defaulting to the preset's value."""
    from jaxpull.core.gates import ATTENTION_RULES, GATES, LAYER_NORM_RULES, POOL_WEIGHTS

    p.add_argument("--rules", choices=list(PRESETS), default=DEFAULT_RULES,
                   help=f"rule set (default {DEFAULT_RULES}): " + "; ".join(f"{n}: {r.description}" for n, r in PRESETS.items()))
    p.add_argument("--steps", type=_number, default=FROM_RULES, help="ascent steps " + _from_rules(lambda r: r.ascent.steps))
    p.add_argument("--alpha", type=_number, default=FROM_RULES, help="ascent step size " + _from_rules(lambda r: r.ascent.alpha))
    p.add_argument("--eps", type=_number_or_none, default=FROM_RULES,
                   help="L2 ball radius around the image, or none for no projection " + _from_rules(lambda r: r.ascent.eps))
    if temperature:
        p.add_argument("--temperature", type=_number, default=FROM_RULES,
                       help="ReLU gate temperature " + _from_rules(lambda r: r.temperature))
    p.add_argument("--pool-temperature", type=_number_or_none, default=FROM_RULES,
                   help="max-pool temperature, none: the ReLU temperature; no effect on models without max-pools "
                   + _from_rules(lambda r: r.pool_temperature))
    p.add_argument("--gate", choices=GATES, default=FROM_RULES, help="ReLU gate " + _from_rules(lambda r: r.gate))
    p.add_argument("--pool-weights", choices=POOL_WEIGHTS, default=FROM_RULES,
                   help="max-pool softmax weights " + _from_rules(lambda r: r.pool_weights))
    # the semantic version's rules (transformer-era layers; no effect on models without them)
    p.add_argument("--gelu-temperature", type=_number_or_none, default=FROM_RULES,
                   help="GELU gate temperature, backward g * Phi(z / t); none: the plain derivative "
                   + _from_rules(lambda r: r.gelu_temperature))
    p.add_argument("--silu-temperature", type=_number_or_none, default=FROM_RULES,
                   help="SiLU gate temperature, backward g * sigmoid(z / t); none: the plain derivative "
                   + _from_rules(lambda r: r.silu_temperature))
    p.add_argument("--layer-norm", choices=LAYER_NORM_RULES, default=FROM_RULES,
                   help="LayerNorm backward: detached (mean and variance held constant) or plain "
                   + _from_rules(lambda r: r.layer_norm))
    p.add_argument("--attention", choices=ATTENTION_RULES, default=FROM_RULES,
                   help="attention backward: tempered (query and key scaled by 1/t, straight through), value_only "
                   "(attention weights held constant) or plain " + _from_rules(lambda r: r.attention))
    p.add_argument("--attention-temperature", type=_number, default=FROM_RULES,
                   help="t of --attention tempered; 1 is the plain gradient " + _from_rules(lambda r: r.attention_temperature))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="jaxpull", description="Excitation pullbacks for ReLU networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert torchvision weights to a jaxpull .safetensors file")
    p.add_argument("arch", help="torchvision architecture name, e.g. resnet50")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V1 or DEFAULT (downloads)")
    src.add_argument("--state-dict", help="a local state_dict file (.pth), loaded with weights_only=True")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--image-size", type=int, default=224, help="input size of the parity check (default 224)")
    p.add_argument("--transform-input", choices=["true", "false"], default=None,
                   help="googlenet / inception_v3 only: torchvision's transform_input (default true, as its pretrained weights)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("explain", help="explain images: the paper's figure of ascent differences")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})")
    p.add_argument("--targets", default="top3", help="comma-separated indices, class names or topN (default top3)")
    p.add_argument("--method", choices=["pullback", "vanilla", "both"], default="both")
    _add_settings(p)
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.add_argument("--save-arrays", help="also write the raw results to this .npz")
    p.set_defaults(run=_explain)

    p = sub.add_parser("demo", help="the embedded default: torchvision's MobileNetV2 on real photos, offline")
    p.add_argument("--model", default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default="jaxpull_demo.png", help="output .png (default jaxpull_demo.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random extra label")
    p.set_defaults(run=_demo)

    p = sub.add_parser("sweep", help="images x labels x temperatures, chunked in a memory budget, to .npy files")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})")
    p.add_argument("--labels", default="all", help="all, a range 0-99, or a comma list (default all)")
    p.add_argument("--temperatures", default=FROM_RULES,
                   help="comma list; 'none' for vanilla " + _from_rules(lambda r: r.temperature))
    p.add_argument("--method", choices=["pullback", "ascent"], default="pullback")
    p.add_argument("--reduce", choices=["maps", "norms", "alignment"], default="alignment")
    _add_settings(p, temperature=False)
    p.add_argument("--memory-budget", default="2GB", help="device memory per chunk (default 2GB)")
    p.add_argument("--chunk-size", type=int, default=None, help="labels per chunk (overrides the budget)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds the same sweep)")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("evaluate", help="score explainers with faithfulness metrics; markdown + CSV report")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, a folder, an ImageNet-style folder of class subfolders, or 'samples' (offline photos)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})")
    p.add_argument("--explainers", default=",".join(("pullback", "pullback_ascent", "gradient", "gradient_ascent")),
                   help="comma list (default pullback,pullback_ascent,gradient,gradient_ascent)")
    p.add_argument("--metrics", default="focus,faithfulness,infidelity", help="comma list (default focus,faithfulness,infidelity)")
    p.add_argument("--labels", default="top1", help="top1 (default), folders (ImageNet-style folder), or one label per image")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (classes in turn)")
    p.add_argument("--mosaics", type=int, default=50, help="number of Focus mosaics (default 50)")
    p.add_argument("--stages", type=int, default=6, help="cascading randomisation steps (default 6)")
    p.add_argument("--sensitivity-samples", type=int, default=10, help="max-sensitivity perturbations per image (default 10)")
    p.add_argument("--rules", choices=list(PRESETS), default=DEFAULT_RULES,
                   help=f"rule set of the pullback and ascent explainers (default {DEFAULT_RULES}); the paper's current "
                   "explainers (SoftPullback, PullbackAscent, PullbackAscentClipLast, SmoothPullback) keep semantic")
    p.add_argument("--temperature", type=_number, default=FROM_RULES,
                   help="temperature of the pullback explainers " + _from_rules(lambda r: r.temperature))
    p.add_argument("--samples", type=int, default=None, help="SmoothGrad / SmoothPullback samples (default 50)")
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
    except MemoryError:
        print("jaxpull: error: out of memory: use smaller or fewer images, or a smaller --chunk-size / --memory-budget",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
