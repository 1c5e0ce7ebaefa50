"""``jaxpull app``: the explorer in the browser, a Gradio page over :mod:`jaxpull.shell.explorer`.

Needs the optional extra: ``pip install 'jaxpull[app]'``. Listens on loopback by default.
Requests are queued one at a time (they share the CPU and the compiled functions); a bad
request shows its one-line message in the page and the server keeps running. Uploads above
:data:`jaxpull.shell.explorer.MAX_UPLOAD_BYTES` are refused. The per-request results and Gradio's
copies of the uploads go to a temporary folder of the server's own, removed when it stops, by
Ctrl-C or by SIGTERM alike.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from jaxpull.core.settings import DEFAULT_RULES, PRESETS, SETTINGS
from jaxpull.files import images
from jaxpull.shell.explorer import (
    DEFAULT_LABEL,
    FORM,
    MAX_UPLOAD_BYTES,
    METHODS,
    STRIP_TEMPERATURES,
    TOP1,
    Explorer,
    preset_form,
)

# The settings shown above the fold; every other one of FORM is in the "All settings" panel.
PRIMARY = ("steps", "alpha", "eps", "temperature", "pool_temperature")

INTRO = (
    "# jaxpull explorer\n"
    "Projected gradient ascent along **excitation pullbacks** (soft ReLU / max-pool gates in the backward "
    "pass only) or along the vanilla gradient. Each row: the clean image, the perturbed image x_K, and "
    "x_K - x0 normalised to [0, 1] (grey = no change). The first request compiles; later ones reuse it."
)


def build(explorer: Explorer):
    """The Gradio ``Blocks`` page for ``explorer``."""
    try:
        import gradio as gr
    except ImportError as e:
        raise RuntimeError(f"the app needs Gradio ({e}): pip install 'jaxpull[app]'") from None

    def guarded(fn, outputs: int):
        """Run ``fn``; on a user error keep the shown results and put the message in the note."""

        def call(*args):
            try:
                return fn(*args)
            except (ValueError, OSError, RuntimeError) as e:
                gr.Warning(str(e))
                return (gr.update(),) * (outputs - 1) + (f"**Error:** {e}",)

        return call

    def on_model(name):
        choices = explorer.class_choices(name)
        return (gr.update(choices=choices, value=TOP1), gr.update(visible=explorer.has_max_pools(name)))

    def preset_values(rules):
        """Every form field's value in the preset ``rules``, in the order of FORM."""
        values = preset_form(rules)
        return tuple(values[n] for n in FORM)

    def control(name: str, value):
        """The control of one setting, generated from its field: a dropdown for a choice, a checkbox
        for a flag, a number field otherwise (steps: no rounding in the page, 2.5 gets a message)."""
        s = SETTINGS[name]
        label = name.replace("_", " ")
        elem_id = name.replace("_", "-")
        if s.kind == "choice":
            return gr.Dropdown(list(s.choices), value=value, label=label, info=s.doc, elem_id=elem_id)
        if s.kind == "flag":
            return gr.Checkbox(value=value, label=label, info=s.doc, elem_id=elem_id)
        if s.field.metadata["optional"]:
            label += " (empty: none)"
        return gr.Number(value, label=label, info=s.doc, elem_id=elem_id)

    samples = list(images.sample_images())
    defaults = preset_form(DEFAULT_RULES)
    # delete_cache: Gradio's copies of uploads and results older than an hour go, checked hourly
    with gr.Blocks(title="jaxpull explorer", delete_cache=(3600, 3600)) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                # a plain file input: jaxpull opens the upload itself (jaxpull.shell.explorer.read_upload), so a
                # file that is no image gets the app's one-line message, not Gradio's preprocessing error
                upload = gr.File(
                    label=f"Upload an image (JPEG, PNG, ...; at most {MAX_UPLOAD_BYTES // 2**20} MB)",
                    type="filepath",
                    elem_id="upload",
                )
                sample = gr.Dropdown(
                    samples, value=samples[0] if samples else None, label="...or a sample photo", elem_id="sample"
                )
                model = gr.Dropdown(list(explorer.models), value=DEFAULT_LABEL, label="Model", elem_id="model")
                target = gr.Dropdown(
                    explorer.class_choices(DEFAULT_LABEL),
                    value=TOP1,
                    filterable=True,
                    label="Target class (type to search)",
                    elem_id="target",
                )
                method = gr.Radio(list(METHODS), value="both", label="Method", elem_id="method")
                rules = gr.Radio(
                    list(PRESETS), value=DEFAULT_RULES, label="Rules (sets every setting below)", elem_id="rules"
                )
                fields = {}
                with gr.Row():
                    for name in PRIMARY:
                        fields[name] = control(name, defaults[name])
                with gr.Accordion("All settings", open=False, elem_id="all-settings"):
                    for name in FORM:
                        if name not in PRIMARY:
                            fields[name] = control(name, defaults[name])
                pool_temperature = fields["pool_temperature"]
                pool_temperature.visible = explorer.has_max_pools(DEFAULT_LABEL)
                form = [fields[n] for n in FORM]
                run = gr.Button("Explain", variant="primary", elem_id="run")
                strip = gr.Button(
                    f"Temperature strip (t = {', '.join(f'{t:g}' for t in STRIP_TEMPERATURES)})", elem_id="strip"
                )
            with gr.Column(scale=2):
                top5 = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="top5")
                note = gr.Markdown(elem_id="note")
                picture = gr.Image(
                    label="clean | perturbed x_K | x_K - x0", type="numpy", interactive=False, elem_id="result"
                )
                arrays = gr.File(label="Raw arrays (.npz: x0, x_K, x_K - x0, target)", elem_id="arrays")
                strip_picture = gr.Image(
                    label="Temperature strip: x_K - x0 per t", type="numpy", interactive=False, elem_id="strip-result"
                )
        model.change(guarded(on_model, 2), model, [target, pool_temperature])
        rules.change(preset_values, rules, form)

        def explain(upload, sample, model, target, method, rules, *values):
            return explorer.explain(
                upload, sample, model, target, method, rules, **dict(zip(FORM, values, strict=True))
            )

        def strip_handler(upload, sample, model, target, rules, *values):
            return explorer.strip(upload, sample, model, target, rules, **dict(zip(FORM, values, strict=True)))

        inputs = [upload, sample, model, target]
        run.click(
            guarded(explain, 4),
            inputs + [method, rules] + form,
            [top5, picture, arrays, note],
            concurrency_id="compute",
        )
        strip.click(guarded(strip_handler, 2), inputs + [rules] + form, [strip_picture, note], concurrency_id="compute")
    page.queue(default_concurrency_limit=1, max_size=64)
    return page


def _stop(signum, frame):
    """SIGTERM: stop as Ctrl-C does (Gradio closes the server; ``serve`` removes its folders)."""
    raise KeyboardInterrupt


def serve(host: str = "127.0.0.1", port: int = 7860, models_dir: str | None = None) -> None:
    """Build the explorer and serve it until interrupted (Ctrl-C or SIGTERM alike).

    Everything the server writes goes to one ``jaxpull-app-*`` temporary folder, removed when it
    stops: the per-request results (``results/``) and Gradio's copies of the uploads
    (``uploads/``, its ``GRADIO_TEMP_DIR``, unless the environment names another)."""
    from jaxpull.shell.explorer import available_models

    available_models(models_dir)  # a bad --models folder: one line, nothing made
    root = Path(tempfile.mkdtemp(prefix="jaxpull-app-"))
    set_temp = "GRADIO_TEMP_DIR" not in os.environ
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        (root / "results").mkdir()
        explorer = Explorer(models_dir, output_dir=str(root / "results"))
        if set_temp:
            (root / "uploads").mkdir()
            os.environ["GRADIO_TEMP_DIR"] = str(root / "uploads")  # read by Gradio when the page is built
        explorer.model(DEFAULT_LABEL)  # load (and on first use convert) before the page opens
        page = build(explorer)
        try:
            page.launch(
                server_name=host,
                server_port=port,
                show_error=True,
                quiet=True,
                prevent_thread_lock=True,
                max_file_size=MAX_UPLOAD_BYTES,
            )
        except OSError as e:
            if "empty port" in str(e):
                raise OSError(f"port {port} on {host} is in use: choose another with --port") from None
            raise
        print(f"jaxpull app: http://{host}:{port} (Ctrl-C stops it)", flush=True)
        page.block_thread()  # returns on KeyboardInterrupt (Ctrl-C, or SIGTERM through _stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)
        if set_temp:
            os.environ.pop("GRADIO_TEMP_DIR", None)
