"""Comparison helpers with the tolerances the tests state, and the runners of the command line."""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple

import numpy as np

from jaxpull_convert.testing import as_numpy as as_np, map_errors  # noqa: F401 (re-exported to the tests)

# Pullbacks and gradients: every map's cosine similarity to the reference, and the largest
# absolute error relative to the reference's largest magnitude (float32 throughout).
COSINE_MIN = 0.9999
REL_ERR_MAX = 1e-3
# Logits: max |jax - torch| <= LOGIT_REL * max(1, max |torch|), as the converter checks.
LOGIT_REL = 1e-4


def assert_maps_close(got, ref, cos_min=COSINE_MIN, rel_max=REL_ERR_MAX):
    cos, rel = map_errors(got, ref)
    assert cos > cos_min and rel < rel_max, f"cosine {cos:.7f} (min {cos_min}), rel err {rel:.2e} (max {rel_max})"


def assert_logits_close(got, ref, rel=LOGIT_REL):
    got, ref = as_np(got), as_np(ref)
    err = np.abs(got - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max |logit error| {err:.3g}"


class Parity(NamedTuple):
    """What :func:`measure_parity` measured: ``labels`` ``(N, K + 2)`` (the targets, then each
    image's two largest logits); ``maps``: method -> jaxpull's ``(N, K + 2, H, W, 3)``; ``errors``:
    ``"logits"`` -> max |error| / max(1, max |logit|), method (and ``"ascent"``) -> (cosine, rel err)."""

    labels: np.ndarray
    maps: dict
    errors: dict


# check_parity's methods: both presets and the vanilla gradient
PARITY_METHODS = {
    "excitation": dict(rules="excitation"),
    "semantic": dict(rules="semantic"),
    "vanilla": dict(rules="vanilla"),
}


def measure_parity(
    tm, model, x: np.ndarray, targets: np.ndarray, methods=None, *, ascent_labels=0, vanilla_float64=True, norm=None
) -> Parity:
    """Compare one converted model with its torch model ``tm`` (eval mode); asserts nothing but
    that the logits are large enough to mean something (:func:`assert_parity` checks the rest).

    * the logits and every method's pullbacks come from one ``jaxpull.compare`` call (one
      compiled function), for ``targets`` followed by each image's two largest logits;
    * ``methods`` (default ``PARITY_METHODS``): name -> ``jaxpull.pullback`` keywords. The
      reference of a gated method is the torch model gated the same way
      (``torch_reference.gated``); of the vanilla gradient (``rules="vanilla"``), torch
      autograd in float64, or with ``vanilla_float64=False`` in float32: hard gates are
      discontinuous, and float32 rounding can flip one, in torch's float32 model alone
      (test_parity_mobile.py) or in it and jaxpull alike (test_parity_more.py);
    * ``ascent_labels`` > 0: also the first method's ascent (its rules and their ascent
      settings) for each image's first ``ascent_labels`` targets.

    ``x``: ``(N, H, W, 3)`` float32 in [-1, 1]; ``targets``: ``(N, K)``; ``norm``: the torch side's
    input normalisation (default: ImageNet's).
    """
    import copy

    import torch

    import jaxpull
    from jaxpull.core.settings import resolve, resolve_both
    from jaxpull_convert import torch_reference as R

    methods = dict(PARITY_METHODS if methods is None else methods)
    norm = norm or R.normalize
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ref_logits = tm(norm(xt)).numpy()
    assert np.abs(ref_logits).max() > 0.1, "the logits are near zero: randomise the model more"
    labels = np.concatenate([targets, np.argsort(-ref_logits, axis=1)[:, :2]], axis=1)
    tt = torch.from_numpy(labels)
    got = jaxpull.compare(model, x, labels, methods)
    maps = {k: as_np(v) for k, v in got.maps.items()}
    errors = {"logits": float(np.abs(as_np(got.logits) - ref_logits).max() / max(1.0, np.abs(ref_logits).max()))}
    for name, kw in methods.items():
        vanilla = resolve(**kw) == resolve("vanilla")
        if vanilla and vanilla_float64:
            ref = R.pullback(copy.deepcopy(tm).double(), xt.double(), tt, norm=lambda a: norm(a).double())
        elif vanilla:
            ref = R.pullback(tm, xt, tt, norm=norm)
        else:
            ref = R.pullback(R.gated(tm, **kw), xt, tt, norm=norm)
        assert maps[name].shape == labels.shape + x.shape[1:]
        errors[name] = map_errors(maps[name], ref)
    if ascent_labels:
        kw = next(iter(methods.values()))
        _, a = resolve_both(kw.get("rules", "excitation"))
        got = as_np(jaxpull.ascent(model, x, targets[:, :ascent_labels], output="diff", **kw))
        ref = R.ascent(
            R.gated(tm, **kw),
            xt,
            torch.from_numpy(targets[:, :ascent_labels]),
            steps=a.steps,
            alpha=a.alpha,
            eps=a.eps,
            clip=a.clip == "every",
            margin=a.margin,
            norm=norm,
        )
        errors["ascent"] = map_errors(got, ref - xt[:, None])
    return Parity(labels, maps, errors)


def assert_parity(parity: Parity, names=None, ascent_rel=REL_ERR_MAX) -> None:
    """The logits within LOGIT_REL, the maps of ``names`` (default: all measured) within
    COSINE_MIN / REL_ERR_MAX, and the ascent (if measured) within ``ascent_rel``."""
    e = parity.errors
    assert e["logits"] <= LOGIT_REL, f"max |logit error| {e['logits']:.3g} of max(1, max |logit|)"
    for name in parity.maps if names is None else names:
        cos, rel = e[name]
        assert cos > COSINE_MIN and rel < REL_ERR_MAX, f"{name}: cosine {cos:.7f} (min {COSINE_MIN}), rel err {rel:.2e}"
    if "ascent" in e:
        cos, rel = e["ascent"]
        assert cos > COSINE_MIN and rel < ascent_rel, f"ascent: cosine {cos:.7f}, rel err {rel:.2e} (max {ascent_rel})"


def check_parity(
    tm, model, x, targets, methods=None, *, ascent_rel=None, ascent_labels=1, vanilla_float64=True, norm=None
) -> Parity:
    """:func:`measure_parity` then :func:`assert_parity`: every method's maps, the logits, and
    with ``ascent_rel`` the first method's ascent for ``ascent_labels`` targets per image."""
    labels = ascent_labels if ascent_rel is not None else 0
    parity = measure_parity(
        tm, model, x, targets, methods, ascent_labels=labels, vanilla_float64=vanilla_float64, norm=norm
    )
    assert_parity(parity, ascent_rel=ascent_rel)
    return parity


class _ShapeOnly(np.ndarray):
    """A stride-0 array standing in for a tensor: its copies (``astype``) take no memory either."""

    def astype(self, dtype, *args, **kwargs):
        return stand_in(self.shape, dtype)


def stand_in(shape, dtype=np.float32) -> np.ndarray:
    """An array of ``shape`` that takes no memory (every stride 0, copies too): for shape-only
    conversions of full-size models (vit_h_14's 632M parameters)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(shape), [0] * len(shape)).view(_ShapeOnly)


def check_layout_shapes(arch: str, tm, **config) -> None:
    """``tm``'s state_dict (typically built on torch's meta device: shapes only, no memory) maps
    through ``arch``'s ``torch_layout`` onto exactly the Flax module's parameter shapes (computed
    abstractly), with no key missing or left over."""
    from flax import traverse_util

    import jaxpull.core.models
    from jaxpull.core.model import ModelSpec, param_shapes
    from jaxpull_convert.state_dict import StateDict

    sd = StateDict({})
    sd.tensors = {k: stand_in(v.shape) for k, v in tm.state_dict().items()}  # not through np.asarray
    params = jaxpull.core.models.get(arch).torch_layout(arch, sd, **config)
    assert sd.missing == [] and sd.unused() == [], (sd.missing[:5], sd.unused()[:5])
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    spec = ModelSpec(arch, config=tuple(sorted(config.items())))
    want = {k: v.shape for k, v in traverse_util.flatten_dict(param_shapes(spec), sep="/").items()}
    assert got == want


# --------------------------------------------------------------------------------------
# The command line: as a real subprocess, or in this process
# --------------------------------------------------------------------------------------

JAXPULL = [sys.executable, "-m", "jaxpull.shell.cli"]


def run(*args, **kw) -> subprocess.CompletedProcess:
    """``jaxpull ARGS`` as a new process (the real command, interpreter start and imports included)."""
    return subprocess.run(JAXPULL + [str(a) for a in args], capture_output=True, text=True, **kw)


def run_in_process(*args) -> subprocess.CompletedProcess:
    """``jaxpull ARGS`` through ``cli.main`` in this process, returned as :func:`run` returns it:
    the exit status (argparse's usage errors included), stdout, and stderr with any warning the
    command raised, filtered as a fresh interpreter's default filters would show it. For the
    tables of bad inputs: the same code path without starting Python, importing jax and, for
    ``convert``, torch again (2-4 s a call)."""
    import contextlib
    import io
    import warnings

    from jaxpull.shell import cli

    out, err = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.resetwarnings()  # Python's defaults (no -W): shown once per place, deprecations hidden
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(["jaxpull", *map(str, args)], code, out.getvalue(), err.getvalue() + shown)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and exactly one stderr line, ``jaxpull: error: ...``, containing ``fragments``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxpull: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
