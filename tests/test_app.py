"""The explorer: its request handlers directly, and the page end to end in a real browser.

The browser test drives Debian's Chromium (``/usr/bin/chromium``, which ``.ci/run`` installs)
through Playwright; where Chromium or Playwright is missing it is skipped with the reason, and
fails instead when the environment variable ``CI`` is set.
It saves a screenshot to ``test-artifacts/app.png``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxpull.shell import explorer as ex

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = (
    Path(__file__).resolve().parent.parent / "test-artifacts"
)  # git-ignored: screenshots for a person to look at


@pytest.fixture(scope="module")
def cache(offline_cache):
    """``JAXPULL_CACHE`` set to the session's cache of the offline default model, for this module."""
    old = os.environ.get("JAXPULL_CACHE")
    os.environ["JAXPULL_CACHE"] = str(offline_cache)
    yield offline_cache
    if old is None:
        del os.environ["JAXPULL_CACHE"]
    else:
        os.environ["JAXPULL_CACHE"] = old


@pytest.fixture(scope="module")
def explorer(cache, tmp_path_factory):
    return ex.Explorer(output_dir=str(tmp_path_factory.mktemp("out")))


def test_explain_handler(explorer):
    top5, picture, path, note = explorer.explain(
        None, "coffee", ex.DEFAULT_LABEL, "967: espresso", "both", steps=2, alpha=20, eps=100, temperature=0.3
    )
    assert list(top5)[0] == "espresso (967)" and top5["espresso (967)"] > 0.9 and len(top5) == 5
    assert picture.dtype == np.uint8 and picture.shape == (2 * 242, 3 * 224, 3)
    assert picture[18:242, 448:].std() > 3  # the difference tile is not blank (uniform grey would be 0)
    data = np.load(path)
    assert int(data["target"]) == 967 and data["pullback_diff"].shape == (224, 224, 3)
    assert np.allclose(data["pullback_xk"] - data["x0"], data["pullback_diff"])
    assert not np.allclose(data["pullback_diff"], data["vanilla_diff"])
    assert "target espresso (967)" in note and "2 steps" in note
    # top-1 by default, a class name works too
    _, _, path, _ = explorer.explain(
        None, "coffee", ex.DEFAULT_LABEL, None, "vanilla gradient", steps=1, alpha=20, eps="", temperature=0.3
    )
    assert int(np.load(path)["target"]) == 967 and "pullback_diff" not in np.load(path)
    assert explorer.target(explorer.model(ex.DEFAULT_LABEL), "tiger cat", np.zeros(1000)) == 282


def test_strip_handler_is_one_vmapped_call(explorer):
    picture, note = explorer.strip(
        None, "chelsea", ex.DEFAULT_LABEL, ex.TOP1, temperatures=(0.1, 1.0, 10.0), steps=1, alpha=20, eps=100
    )
    assert picture.shape == (242, 3 * 224, 3) and "3 temperatures in one vmapped call" in note
    tiles = picture[18:].reshape(224, 3, 224, 3).transpose(1, 0, 2, 3)
    assert all(t.std() > 3 for t in tiles) and not np.array_equal(tiles[0], tiles[2])
    cache_size = ex.strip_core._cache_size()
    explorer.strip(
        None, "chelsea", ex.DEFAULT_LABEL, "0: tench", temperatures=(0.2, 2.0, 20.0), steps=2, alpha=10, eps=50
    )
    assert ex.strip_core._cache_size() == cache_size  # new temperatures, label, steps: no recompilation


def test_class_choices_and_models(explorer, tmp_path):
    choices = explorer.class_choices(ex.DEFAULT_LABEL)
    assert choices[0] == ex.TOP1 and choices[283] == "282: tiger cat" and len(choices) == 1001
    assert not explorer.has_max_pools(ex.DEFAULT_LABEL)
    shutil.copy(
        Path(os.environ["JAXPULL_CACHE"]) / f"{ex.cache.DEFAULT_MODEL}.safetensors", tmp_path / "mine.safetensors"
    )
    other = ex.Explorer(str(tmp_path))
    assert list(other.models) == [ex.DEFAULT_LABEL, "mine"]
    (tmp_path / "mine.safetensors").unlink()
    with pytest.raises(ValueError, match="model file .*mine.safetensors is missing"):
        other.model("mine")
    with pytest.raises(ValueError, match="does not exist"):
        ex.Explorer(str(tmp_path / "nowhere"))


def test_bad_requests_give_one_line_messages(explorer, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_text("this is not a picture")
    base = dict(
        upload=None,
        sample="coffee",
        model_name=ex.DEFAULT_LABEL,
        target=None,
        method="both",
        steps=1,
        alpha=20,
        eps=100,
        temperature=0.3,
    )
    cases = [
        (dict(upload=str(junk)), "not an image this app can read"),
        (dict(sample=None), "no image: upload one or pick a sample photo"),
        (dict(steps=-1), r"steps must be a whole number in \[1, 1e\+05\], got -1"),
        (dict(steps=2.5), "steps must be a whole number in .*, got 2.5"),
        (dict(steps=101), "steps = 101 is more than this app runs"),
        (dict(alpha=0), "alpha must be a positive number up to 1e\\+06, got 0"),
        (dict(temperature="warm"), "temperature must be a number"),
        (dict(temperature=None), "temperature is empty"),
        (dict(eps=-3), "eps must be a positive number up to 1e\\+06 or None, got -3"),
        (dict(gelu="none"), "unknown gelu 'none': use one of gate, plain"),
        (dict(rules="paper"), "unknown rules 'paper'"),
        (dict(target="999999"), "out of range"),
        (dict(target="no such class"), "neither an index nor a class name"),
        (dict(model_name="resnet50"), "unknown model 'resnet50'"),
        (dict(method="lime"), "unknown method 'lime'"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            explorer.explain(**{**base, **change})


def test_huge_upload_is_downscaled_with_a_note(explorer, tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(big, quality=80)
    _, picture, _, note = explorer.explain(
        str(big), None, ex.DEFAULT_LABEL, None, "vanilla gradient", steps=1, alpha=20, eps=100, temperature=0.3
    )
    assert "6000x4000 pixels: downscaled" in note and picture.shape == (242, 672, 3)
    png = tmp_path / "rgba.png"
    Image.new("RGBA", (300, 200), (0, 0, 255, 128)).save(png)
    x, note = ex.read_upload(str(png))
    assert x.shape == (224, 224, 3) and note == ""


# --------------------------------------------------------------------------------------
# End to end in a real browser
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip():
    """Playwright's entry point; where Chromium or Playwright is missing, a skip with the reason,
    or a failure when ``CI`` is set (CI must run the browser test, not report it passed)."""
    missing = lambda why: pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    if not os.path.exists(CHROMIUM):
        missing(f"BROWSER TEST NOT RUN: {CHROMIUM} is missing (apt-get install -y chromium, as .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("BROWSER TEST NOT RUN: the playwright package is missing (pip install 'jaxpull[test]')")
    return sync_playwright


def test_app_in_a_real_browser(cache, tmp_path):
    sync_playwright = _browser_or_skip()
    port = _free_port()
    env = dict(os.environ, JAXPULL_CACHE=str(cache))
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxpull.shell.cli", "app", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                assert time.time() < deadline, "the app did not start within 180 s"
                time.sleep(1)
        flags = [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.locator("#sample input").click()
            page.locator("#sample input").fill("coffee")
            page.get_by_role("option", name="coffee").click()
            target = page.locator("#target input")
            target.click()
            target.fill("")
            target.press_sequentially("espresso", delay=20)
            page.get_by_role("option", name="967: espresso").click()
            page.locator("#steps input").fill("2")
            page.locator("#run").click()
            page.locator("#top5").get_by_text("espresso (967)").first.wait_for(timeout=180_000)
            page.locator("#result img").wait_for(timeout=60_000)
            text = page.locator("#top5").inner_text()
            # the page's top-1 probability is the library's, for the default model on this photo
            from jaxpull.files import cache, images

            model = cache.resolve(cache.DEFAULT_MODEL, log=lambda m: None)
            logits = np.asarray(
                model(images.load_images(images.sample_paths(["coffee"]), **model.preprocessing.image_options))
            )[0]
            p = np.exp(logits - logits.max())
            p /= p.sum()
            assert int(np.argmax(p)) == 967 and "espresso (967)" in text and f"{p[967]:.0%}" in text
            assert "cup (968)" in text  # a near class, among the top 5
            assert "target espresso (967); 2 steps" in page.locator("#note").inner_text()
            shot = np.asarray(Image.open(io.BytesIO(page.locator("#result img").screenshot())).convert("L"))
            assert shot.shape[0] > 200 and shot.std() > 10  # the result image is not blank
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
            # a bad number shows a message in the page, the result stays, the server keeps running
            page.locator("#alpha input").fill("-5")
            page.locator("#run").click()
            page.locator("#note").get_by_text("alpha must be a positive number").wait_for(timeout=60_000)
            assert page.locator("#result img").is_visible()
            page.screenshot(path=str(ARTIFACTS / "app-error.png"), full_page=True)
            browser.close()
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_app_command_bad_input(tmp_path):
    from helpers import assert_one_line_error, run, run_in_process

    assert_one_line_error(run("app", "--port", "70000"), "--port 70000 is not a TCP port")
    assert_one_line_error(run_in_process("app", "--models", tmp_path / "none"), "models folder", "does not exist")


def _wait_for(url: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, log.read_text()
            assert time.time() < deadline, f"the app did not start within {seconds} s"
            time.sleep(0.5)


def _upload(url: str, name: str, data: bytes):
    """POST one file to Gradio's upload route: (HTTP status, response text)."""
    boundary = "jaxpull-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_sigterm_removes_the_results_and_upload_copies_and_big_uploads_are_refused(cache, tmp_path):
    """SIGTERM (what a service manager sends) cleans up as Ctrl-C does: the server's temporary folder
    with the per-request results and Gradio's copies of the uploads goes; an upload above the stated
    size is refused before it is stored."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = _free_port()
    env = dict(os.environ, JAXPULL_CACHE=str(cache), TMPDIR=str(temp))
    env.pop("GRADIO_TEMP_DIR", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jaxpull.shell.cli", "app", "--port", str(port)], stdout=out, stderr=out, env=env
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, server, log)
        folders = list(temp.glob("jaxpull-app-*"))
        assert len(folders) == 1 and (folders[0] / "results").is_dir()
        status, text = _upload(url, "small.png", b"\x89PNG not really")
        assert status == 200, text
        stored = Path(json.loads(text)[0])
        assert stored.is_file() and folders[0] in stored.parents  # Gradio's copy, in the server's folder
        status, text = _upload(url, "big.png", b"\0" * (ex.MAX_UPLOAD_BYTES + 1))
        assert status == 413 and "maximum allowed size" in text, (status, text[:200])
        assert len([p for p in folders[0].rglob("*") if p.is_file()]) == 1  # the big one was not kept
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert not folders[0].exists() and not stored.exists(), log.read_text()
    assert [p.name for p in temp.iterdir() if p.name.startswith("jaxpull")] == []


def test_uploads_above_the_limit_are_refused_in_one_line(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(ex.MAX_UPLOAD_BYTES + 1)  # sparse: nothing written
    with pytest.raises(ValueError) as e:
        ex.read_upload(str(big))
    assert "more than this app takes (50 MB): upload a smaller file" in str(e.value) and "\n" not in str(e.value)


def test_results_that_are_not_finite_are_refused(explorer):
    """An ascent whose relative steps overflow float32: no picture of NaN, a line naming the settings."""
    bad = dict(steps=10, alpha=1e6, eps="", temperature=0.3, relative_alpha=True, clip="none")
    with pytest.raises(ValueError) as e:
        explorer.explain(None, "coffee", ex.DEFAULT_LABEL, None, "excitation pullback", **bad)
    text = str(e.value)
    assert "\n" not in text and "the excitation pullback ascent hold" in text and "relative_alpha=True" in text
