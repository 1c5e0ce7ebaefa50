"""The ``jaxpull`` command line: a thin shell over the library.

Every failure a user can cause prints one line, ``jaxpull: error: ...``, and exits with 2;
nothing is left half-written (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jaxpull.core.rules.base import SettingError
from jaxpull.core.settings import DEFAULT_RULES, PRESETS, SETTINGS

DEFAULT_MODEL = "mobilenet_v2"  # jaxpull.files.cache.DEFAULT_MODEL (not imported here: that loads jax)


def _not_installed(args: argparse.Namespace) -> int:
    raise RuntimeError(
        f"the {args.command} command comes with jaxpull's converter, whose entry points are not installed: "
        "pip install -e '.[convert]' in a checkout, or pip install 'jaxpull[convert]'"
    )


def _add_plugin_commands(sub) -> None:
    """The subcommands installed packages register (:mod:`jaxpull.plugins`): ``convert`` from the
    converter; without it, a ``convert`` that says how to install it."""
    from jaxpull import plugins

    commands = plugins.load(plugins.COMMANDS)
    for _, add in commands:
        add(sub)
    if "convert" not in {name for name, _ in commands}:
        p = sub.add_parser("convert", help="convert torchvision weights (needs 'jaxpull[convert]')")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(run=_not_installed)


def _given(args: argparse.Namespace) -> dict:
    """The rule and ascent setting flags the user gave (a flag not given is absent from ``args``; its
    value comes from ``--rules``)."""
    return {n: getattr(args, n) for n in SETTINGS if hasattr(args, n)}


def _explain(args: argparse.Namespace) -> int:
    from jaxpull.shell import tasks

    tasks.explain(
        args.model,
        args.images,
        args.output,
        target_spec=args.targets,
        method=args.method,
        arrays_path=args.save_arrays,
        rules=args.rules,
        **_given(args),
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jaxpull.shell import tasks

    tasks.demo(args.model, args.output, args.seed)
    return 0


def parse_bytes(text: str, flag: str = "--memory-budget") -> float:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes: a finite positive number, else a one-line ValueError."""
    t = text.strip().upper().replace("IB", "B")
    for suffix, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], scale
            break
    else:
        factor = 1
    try:
        value = float(t) * factor
    except ValueError:
        raise ValueError(f"{flag}: cannot read memory size {text!r}: use e.g. 2GB or 512MB") from None
    if not 0 < value < float("inf"):  # also false for NaN
        raise ValueError(f"{flag} must be a finite positive size such as 2GB or 512MB, got {text!r}")
    return value


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


def _processes(args: argparse.Namespace):
    """The distributed settings of ``sweep`` or ``evaluate`` (checked), or None for one process: the
    flags, else what ``jax.distributed.initialize()`` would detect (SLURM, Open MPI, Cloud TPU)."""
    from jaxpull.shell import distributed

    processes = distributed.Settings(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    if processes.explicit or distributed.cluster_detected():
        return processes
    return None


def _sweep(args: argparse.Namespace) -> int:
    from jaxpull.shell import distributed, tasks

    given = _given(args)
    temperatures = None if args.temperatures is None else parse_temperatures(args.temperatures)
    budget = parse_bytes(args.memory_budget)
    processes = _processes(args)
    if processes is not None and not distributed.is_worker():
        # the sweep runs in a child that joins the runtime: its fatal errors become one line here
        return distributed.supervise(args.argv, processes, args.out)
    tasks.sweep(
        args.model,
        args.images,
        args.out,
        labels=args.labels,
        temperatures=temperatures,
        method=args.method,
        reduce=args.reduce,
        memory_budget=budget,
        chunk_size=args.chunk_size,
        rules=args.rules,
        processes=processes,
        **given,
    )
    return 0


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _recorded(argv: list[str], dropped: list[str]) -> str:
    """``jaxpull ARGV`` as a report records it: without the flags ``dropped`` and their values
    (also abbreviated, or as ``--flag=value``), so the report does not depend on them."""
    kept, value = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if value:
            value = False
        elif len(name) > 2 and name.startswith("--") and any(f.startswith(name) for f in dropped):
            value = "=" not in a
        else:
            kept.append(a)
    return "jaxpull " + " ".join(shlex.quote(a) for a in kept)


def _evaluate(args: argparse.Namespace) -> int:
    from jaxpull.shell import distributed, tasks

    processes = _processes(args)
    if processes is not None and not distributed.is_worker():
        # as a sweep: the evaluation runs in a child that joins the runtime, its fatal errors one line here
        return distributed.supervise(args.argv, processes, args.work_dir)
    tasks.evaluate(
        args.images,
        args.model,
        args.output,
        protocol=args.protocol,
        explainer_names=None if args.explainers is None else _split(args.explainers),
        metric_names=None if args.metrics is None else _split(args.metrics),
        labels=args.labels,
        limit=args.limit,
        mosaics=args.mosaics,
        stages=args.stages,
        sensitivity_samples=args.sensitivity_samples,
        rules=getattr(args, "rules", None),
        overrides=_given(args),
        samples=args.samples,
        resamples=args.resamples,
        seed=args.seed,
        batch_size=args.batch_size,
        gradcam_layer=args.gradcam_layer,
        focus_images=args.focus_images,
        work_dir=args.work_dir,
        command=_recorded(args.argv, args.distributed_flags),  # the same report however many processes
        processes=processes,
    )
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


def _preset_defaults(name: str) -> str:
    """``(default 5)`` when the presets agree, else ``(default from --rules: excitation 0.3, semantic 0.6, ...)``."""
    s = SETTINGS[name]
    values = {}
    for preset_name, p in PRESETS.items():
        v = s.get(p.ascent if s.part == "ascent" else getattr(p.rules, s.part))
        values[preset_name] = "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    if len(set(values.values())) == 1:
        return f"(default {next(iter(values.values()))})"
    return "(default from --rules: " + ", ".join(f"{n} {v}" for n, v in values.items()) + ")"


def _add_settings(p: argparse.ArgumentParser, skip=(), table=None, rules_default: str | None = DEFAULT_RULES) -> None:
    """``--rules`` and one flag per rule and ascent setting of ``table`` (default
    :data:`jaxpull.core.settings.SETTINGS`), generated from the settings' own fields: a flag not given
    is absent from the parsed arguments, and the setting takes the preset's value. ``rules_default``
    None: ``--rules`` too is absent unless given (the command chooses; its help says how)."""
    chosen = (
        f"default {rules_default}" if rules_default else "default: the protocol's, quick excitation, paper semantic"
    )
    p.add_argument(
        "--rules",
        choices=list(PRESETS),
        default=rules_default or argparse.SUPPRESS,
        help=f"rule set ({chosen}): " + "; ".join(f"{n}: {r.description}" for n, r in PRESETS.items()),
    )
    for name, s in (SETTINGS if table is None else table).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{s.doc} {_preset_defaults(name)}" if name in SETTINGS else s.doc
        if s.kind == "choice":
            p.add_argument(flag, choices=s.choices, default=argparse.SUPPRESS, help=help_text)
        elif s.kind == "flag":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            optional = s.field.metadata["optional"]
            kind = _number_or_none if optional else _number
            p.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                metavar="NUMBER" + ("|none" if optional else ""),
                help=help_text,
            )


def _add_distributed(p: argparse.ArgumentParser, directory: str = "--out") -> None:
    """``--coordinator HOST:PORT --num-processes N --process-id I``: several processes on JAX's
    distributed runtime, the same command in each (without them: what jax.distributed detects),
    sharing the ``directory`` flag's directory. Their names go to ``args.distributed_flags``."""
    from jaxpull.shell.distributed import DEFAULT_TIMEOUT

    g = p.add_argument_group(
        "several processes (JAX's distributed runtime; the same command in every process, "
        f"{directory} on a shared filesystem)"
    )
    added = [
        g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 and a free port there"),
        g.add_argument("--num-processes", type=int, metavar="N", help="number of processes"),
        g.add_argument("--process-id", type=int, metavar="I", help="this process: 0 to N-1 (0 runs the coordinator)"),
        g.add_argument(
            "--distributed-timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help=f"the longest wait for joining, the start-up checks and a silent process (default {DEFAULT_TIMEOUT})",
        ),
    ]
    p.set_defaults(distributed_flags=[f for a in added for f in a.option_strings])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="jaxpull", description="Excitation pullbacks for ReLU networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_plugin_commands(sub)

    p = sub.add_parser("explain", help="explain images: the paper's figure of ascent differences")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})"
    )
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
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})"
    )
    p.add_argument("--labels", default="all", help="all, a range 0-99, or a comma list (default all)")
    p.add_argument(
        "--temperatures",
        default=None,
        help="comma list of ReLU temperatures; 'none' for the exact gradient (default: the --temperature of --rules)",
    )
    p.add_argument("--method", choices=["pullback", "ascent"], default="pullback")
    p.add_argument("--reduce", choices=["maps", "norms", "alignment"], default="alignment")
    _add_settings(p, skip=("temperature",))
    p.add_argument("--memory-budget", default="2GB", help="device memory per chunk (default 2GB)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="labels per chunk, at most the number of labels (overrides the budget)",
    )
    p.add_argument("--out", required=True, help="output directory (resumed if it holds the same sweep)")
    _add_distributed(p)
    p.set_defaults(run=_sweep)

    p = sub.add_parser("evaluate", help="score explainers with faithfulness metrics; markdown + CSV report")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="image files, a folder, an ImageNet-style folder of class subfolders, or 'samples' (offline photos)",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a .safetensors file or a cached model name (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--protocol",
        choices=["quick", "paper"],
        default="quick",
        help="quick (default): jaxpull's own quick protocol, every explainer against the gradient; paper: the "
        "paper's table (its Infidelity, Faithfulness Correlation and Estimate, Monotonicity Correlation, "
        "Max-Sensitivity, Random Logit, Focus on its mosaics) with each pullback against its baseline",
    )
    p.add_argument(
        "--explainers",
        default=None,
        help="comma list, or 'all' (default: quick: pullback,pullback_ascent,gradient,gradient_ascent; "
        "paper: the paper's 19, those that cannot run on the model left out with a note)",
    )
    p.add_argument("--metrics", default=None, help="comma list (default: the protocol's)")
    p.add_argument(
        "--labels",
        default="top1",
        help="top1 (default), folders (class folders named by WordNet id, class name or index), or one label per image",
    )
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (classes in turn)")
    p.add_argument("--mosaics", type=int, default=None, help="number of Focus mosaics (default: quick 50, paper 100)")
    p.add_argument(
        "--focus-images",
        choices=["repeated", "distinct"],
        default=None,
        help="paper protocol: the mosaics' target image repeated in both target quadrants (default, the paper's) "
        "or two distinct images of the target class (the original Focus paper's)",
    )
    p.add_argument("--stages", type=int, default=6, help="cascading randomisation steps (default 6)")
    p.add_argument(
        "--sensitivity-samples",
        type=int,
        default=None,
        help="quick protocol: max-sensitivity perturbations per image (default 10)",
    )
    _add_settings(p, rules_default=None)  # the rules of the pullback explainers
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="noisy copies of the noisy explainers (default: each one's own: SmoothGrad 50, FusionGrad 10 per model, "
        "GradientShap 5, and their pullback forms)",
    )
    p.add_argument("--gradcam-layer", default=None, help="the layer of the GradCAM explainers (default: the family's)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default: quick 2000, paper 10000)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per unit of work (default: quick 8, paper 10)")
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep every finished batch here and resume from it (default: OUTPUT.work, removed once the report "
        "is written; required with several processes)",
    )
    p.add_argument("-o", "--output", required=True, help="output .md (a .csv is written beside it)")
    _add_distributed(p, "--work-dir")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("app", help="the interactive explorer in the browser (needs 'jaxpull[app]')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models", default=None, help="folder of converted .safetensors files to offer")
    p.set_defaults(run=_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxpull`` command; returns the exit status."""
    try:
        parser = build_parser()
    except RuntimeError as e:  # a broken plugin install
        print(f"jaxpull: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("jaxpull: interrupted", file=sys.stderr)
        return 130
    except SettingError as e:  # a setting's value: named as the flag the user typed
        print(f"jaxpull: error: {e.as_flag()}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"jaxpull: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "jaxpull: error: out of memory: use smaller or fewer images, or a smaller --chunk-size / --memory-budget",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
