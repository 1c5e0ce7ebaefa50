"""Comparison helpers with the tolerances the tests state, and the runners of the command line."""

from __future__ import annotations

import subprocess
import sys

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


def check_parity(
    tm,
    model,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    presets=("excitation", "semantic"),
    vanilla: bool = True,
    ascent_rel=None,
    norm=None,
) -> dict:
    """Every parity check of one converted model against its torch model ``tm`` (eval mode).

    * logits (LOGIT_REL);
    * the pullbacks of each rules preset (every rule of the preset, gated the same way in the
      torch reference: ``torch_reference.gated_like``), maps within COSINE_MIN / REL_ERR_MAX;
    * ``vanilla``: plain gradients of each image's two largest logits, against torch autograd in
      float64 (hard gates are discontinuous in the weights: float32 rounding can flip one);
    * ``ascent_rel``: also the first preset's ascent (its settings, one pair per image), x_K - x0
      within this relative tolerance.

    ``x``: ``(N, H, W, 3)`` float32 in [-1, 1]; ``targets``: ``(N, K)``; ``norm``: the torch
    side's input normalisation (default: ImageNet's). Returns the measured errors by check.
    """
    import copy

    import torch

    import jaxpull
    from jaxpull.core.settings import make_ascent, make_gating
    from jaxpull_convert import torch_reference as R

    norm = norm or R.normalize
    xt, tt = torch.from_numpy(x), torch.from_numpy(targets)
    errors = {}
    with torch.no_grad():
        ref_logits = tm(norm(xt))
    assert ref_logits.abs().max() > 0.1, "the logits are near zero: randomise the model more"
    assert_logits_close(model(x), ref_logits)
    errors["logits"] = float(np.abs(as_np(model(x)) - ref_logits.numpy()).max())
    for rules in presets:
        got = jaxpull.pullback(model, x, targets, rules=rules)
        assert got.shape == targets.shape + x.shape[1:]
        ref = R.pullback(R.gated_like(tm, make_gating(rules=rules)), xt, tt, norm=norm)
        assert_maps_close(got, ref)
        errors[rules] = map_errors(got, ref)
    if vanilla:
        top = np.argsort(-ref_logits.numpy(), axis=1)[:, :2]
        got = jaxpull.pullback(model, x, top, temperature=None)
        ref = R.pullback(
            copy.deepcopy(tm).double(), xt.double(), torch.from_numpy(top), norm=lambda a: norm(a).double()
        )
        assert_maps_close(got, ref)
        errors["vanilla"] = map_errors(got, ref)
    if ascent_rel is not None:
        rules = presets[0]
        a = make_ascent(rules=rules)
        got = jaxpull.ascent(model, x, targets[:, :1], rules=rules)
        ref = R.ascent(
            R.gated_like(tm, make_gating(rules=rules)),
            xt,
            tt[:, :1],
            steps=a.steps,
            alpha=a.alpha,
            eps=a.eps,
            clip=a.clip,
            margin=a.margin,
            norm=norm,
        )
        assert_maps_close(np.asarray(got) - x[:, None], ref - xt[:, None], rel_max=ascent_rel)
        errors["ascent"] = map_errors(np.asarray(got) - x[:, None], ref - xt[:, None])
    return errors


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
