"""`condiff ui` in a real browser: Debian's headless chromium driven by selenium (chromedriver at
/usr/bin/chromedriver, nothing downloaded) against `condiff ui --port <free port>` started as a subprocess.

One test walks the app as a person would: a sample with the live preview (one frame per solver step, counted
in the page) whose labeller readings equal condiff.data.labeller's on the same library call; a comparison; an
edit of an uploaded PNG; an inpainting with a mask painted on the canvas; a dozen bad inputs, each one line on
the page, after which the app still works; four sampling requests at once from four windows, all done; a run
stopped with the Stop button; and Ctrl-C of the server (exit 130, one line, no traceback). Screenshots of each
tab with its result go to a temporary folder, or to docs/ui/*.png with CONDIFF_UPDATE_SCREENSHOTS=1.

Skipped only when /usr/bin/chromium is absent (CI installs chromium and chromium-driver)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "docs" / "examples"
PROMPT = "large red circle top-left"
STEPS = 6
FINAL = ("done", "error", "stopped")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_sigint():
    """In the child: SIGINT at its default, so that the server's Ctrl-C is testable when the test run itself was
    started in the background (it inherits an ignored SIGINT, which condiff rightly keeps ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """`condiff ui` as a subprocess, its output drained by threads."""

    def __init__(self, cwd: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
        env.pop("GRADIO_SERVER_PORT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "condiff.cli", "ui", "--port", str(self.port)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        self.out, self.err = [], []
        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, i=into: i.extend(iter(s.readline, "")), daemon=True).start()

    def wait_ready(self, limit: float = 60):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            assert self.proc.poll() is None, f"condiff ui exited: {''.join(self.err)[-2000:]}"
            if any("serving on" in line for line in self.out):
                return
            time.sleep(0.1)
        raise AssertionError(f"condiff ui did not start in {limit} s: {''.join(self.out + self.err)[-2000:]}")

    def stop(self):
        """Ctrl-C (the server removes its temporary folder), then kill if it is still there."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def make_driver(profile: Path):
    os.environ["SE_MANAGER"] = "false"  # never let selenium-manager fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMEDRIVER.exists(), "chromium is installed but not its driver: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


class Page:
    """Helpers over one browser window of the app."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By

    def css(self, selector):
        return self.d.find_element(self.By.CSS_SELECTOR, selector)

    def loaded(self, limit: float = 30):
        """Wait for the app to render (its first run button)."""
        t0 = time.monotonic()
        while not self.d.find_elements(self.By.CSS_SELECTOR, "#sample-run"):
            assert time.monotonic() - t0 < limit, "the page did not render"
            time.sleep(0.1)

    def tab(self, name: str):
        buttons = self.d.find_elements(self.By.CSS_SELECTOR, "button[role=tab]")
        [b for b in buttons if b.text.strip() == name][0].click()
        time.sleep(0.3)

    def field(self, elem_id: str):
        return self.css(f"#{elem_id} textarea, #{elem_id} input:not([type=file])")

    def type(self, elem_id: str, value):
        from selenium.webdriver.common.keys import Keys

        el = self.field(elem_id)
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        if str(value):
            el.send_keys(str(value))
        self.d.execute_script("arguments[0].blur()", el)  # gradio takes the value (no focus moves to a dropdown)

    def text(self, elem_id: str) -> str:
        return self.css(f"#{elem_id}").text.strip()

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).get_attribute("value")

    def run(self, prefix: str, limit: float = 60) -> str:
        """Click the tab's run button and wait for a new final status line (done / error / stopped)."""
        before = self.text(f"{prefix}-status")
        self.css(f"#{prefix}-run").click()
        return self.wait_status(prefix, before, limit)

    def wait_status(self, prefix: str, before: str, limit: float = 60) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            now = self.text(f"{prefix}-status")
            if now != before and now.startswith(FINAL):
                return now
            time.sleep(0.1)
        raise AssertionError(f"{prefix}: no new status in {limit} s (still {self.text(f'{prefix}-status')!r})")

    def record(self, prefix: str) -> dict:
        box = self.css(f"#{prefix}-record-box")
        if not self.d.find_elements(self.By.CSS_SELECTOR, f"#{prefix}-record textarea"):
            box.find_element(self.By.CSS_SELECTOR, "button").click()
            time.sleep(0.3)
        return json.loads(self.css(f"#{prefix}-record textarea").get_attribute("value"))

    def upload(self, elem_id: str, path: Path):
        self.css(f"#{elem_id} input[type=file]").send_keys(str(path))
        time.sleep(1.0)

    def screenshot(self, path: Path):
        """The whole page (the window made as tall as the page)."""
        self.d.execute_script("window.scrollTo(0, 0)")
        height, chrome = self.d.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
        )
        self.d.set_window_size(1400, min(max(height, 1000), 4000) + chrome)
        time.sleep(0.4)
        self.d.save_screenshot(str(path))
        self.d.set_window_size(1400, 1000)


def expected_sample(seed: int, n: int):
    """The same library call `condiff sample` makes, here: images, labeller rows and the eval score."""
    from condiff.cli import common
    from condiff.data import labeller
    from condiff.evaluation.evaluate import generate_counted

    family, sol, _, spc, _ = common.sampling_setup("shapes", "dpmpp-2m", STEPS, 3.0, None, None, None, None, None)
    raw = family.parse_prompt(PROMPT).expand(n, -1)
    m = common.load_model("shapes")
    images, _, _ = generate_counted(m, raw, sol, STEPS, 3.0, torch.Generator().manual_seed(seed), spc, 256)
    return labeller.label(images).tolist(), family.score(images, family.attribute_targets(raw))


FRAME_WATCH = """
window.__steps = new Set(); window.__srcs = new Set();
const f = document.querySelector('#sample-frames'), p = document.querySelector('#sample-preview');
new MutationObserver(() => { const m = f.innerText.match(/preview: step (\\d+) of (\\d+)/);
  if (m) window.__steps.add(Number(m[1])); }).observe(f, {subtree: true, childList: true, characterData: true});
new MutationObserver(() => p.querySelectorAll('img').forEach(i => window.__srcs.add(i.src)))
  .observe(p, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_ui_in_a_browser(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    t_start = time.monotonic()
    shots = ROOT / "docs" / "ui" if os.environ.get("CONDIFF_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    server = Server(tmp_path)
    timings = {}
    driver = None
    try:
        labels, accuracy = expected_sample(seed=1, n=4)  # in this process while the server starts
        server.wait_ready()
        timings["server ready"] = time.monotonic() - t_start
        driver = make_driver(tmp_path / "profile")
        driver.get(server.url)
        page = Page(driver)
        page.loaded()

        # ---- sample: live preview, readings, command --------------------------------------------------
        t0 = time.monotonic()
        page.type("sample-steps", STEPS)
        page.type("sample-seed", 1)
        driver.execute_script(FRAME_WATCH)
        status = page.run("sample")
        assert status.startswith(f"done: 4 images, {STEPS} NFE"), status
        steps_seen = driver.execute_script("return Array.from(window.__steps).sort((a, b) => a - b)")
        srcs_seen = driver.execute_script("return window.__srcs.size")
        assert steps_seen == list(range(1, STEPS + 1)), steps_seen  # one preview frame per solver step
        assert srcs_seen >= STEPS - 1, srcs_seen
        assert page.text("sample-frames") == f"preview: {STEPS} frames shown for {STEPS} solver steps"
        page.screenshot(shots / "sample.png")
        record = page.record("sample")
        assert record["preview_frames"] == STEPS
        assert [row["labels"] for row in record["readings"]["images"]] == labels
        assert record["readings"]["accuracy"] == accuracy
        table = page.text("sample-readings")
        assert table.count("large red circle top-left") == sum(row[1] == 0 for row in labels), table
        command = page.value("sample-command")
        assert command.startswith(
            f"condiff sample --model shapes --prompt '{PROMPT}' --solver dpmpp-2m --steps {STEPS} --cfg 3 --n 4 "
            "--seed 1 --out grid.png"
        ), command
        assert len(driver.find_elements(page.By.CSS_SELECTOR, "#sample-gallery img")) >= 4
        timings["sample"] = time.monotonic() - t0

        # ---- compare ---------------------------------------------------------------------------------
        t0 = time.monotonic()
        page.tab("Compare")
        status = page.run("compare")
        assert status.startswith("done: 3 settings"), status
        table = page.text("compare-table")
        assert "--solver ddim --steps 8" in table and "--ag 0.995" in table
        assert len(driver.find_elements(page.By.CSS_SELECTOR, "#compare-gallery img")) >= 3
        assert page.value("compare-commands").count("condiff sample") == 3
        page.screenshot(shots / "compare.png")
        timings["compare"] = time.monotonic() - t0

        # ---- edit an uploaded PNG --------------------------------------------------------------------
        t0 = time.monotonic()
        page.tab("Edit")
        status = page.run("edit")
        assert status.startswith("error: --image: no image was given"), status  # bad input 1
        page.upload("edit-image", EXAMPLES / "red_circle.png")
        page.type("edit-from", PROMPT)
        page.type("edit-to", "large blue circle top-left")
        page.type("edit-steps", 10)
        page.type("edit-method-opt", "frobnicate=1")
        status = page.run("edit")
        assert status.startswith("error: ") and "frobnicate" in status, status  # bad input 2
        page.type("edit-method-opt", "")
        status = page.run("edit")
        assert status.startswith("done: edit-friendly") and "PSNR" in status, status
        assert "labeller reads the edit as 'large blue circle top-left'" in status, status
        assert page.value("edit-command") == (
            "condiff edit --model shapes --image red_circle.png --from 'large red circle top-left' --to "
            "'large blue circle top-left' --method edit-friendly --steps 10 --seed 0 --out edited.png --threads 1"
        )
        assert len(driver.find_elements(page.By.CSS_SELECTOR, "#edit-gallery img")) >= 3
        page.screenshot(shots / "edit.png")
        timings["edit"] = time.monotonic() - t0

        # ---- restore: inpaint a mask painted on the canvas ---------------------------------------------
        t0 = time.monotonic()
        page.tab("Restore")
        page.upload("restore-image", EXAMPLES / "red_circle.png")
        page.type("restore-steps", 10)
        status = page.run("restore")
        assert status.startswith("error: ") and "paint the area to fill" in status, status  # bad input 3
        canvas = driver.find_elements(page.By.CSS_SELECTOR, "#restore-mask canvas")[-1]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
        time.sleep(0.3)
        # paint the image's top-left quarter (the red circle) in five strokes; the image is centred in the canvas
        half = min(canvas.size["width"], canvas.size["height"]) * 0.42
        for y in (-0.9, -0.7, -0.5, -0.3, -0.12):
            stroke = ActionChains(driver, duration=20).move_to_element_with_offset(
                canvas, int(-0.95 * half), int(y * half)
            )
            stroke.click_and_hold()
            for _ in range(9):
                stroke.move_by_offset(int(0.1 * half), 0)
            stroke.release().perform()
        time.sleep(0.5)
        page.type("restore-prompt", "large green square top-left")
        status = page.run("restore")
        assert status.startswith("done: inpaint") and "max|A x - y| 0.0e+00" in status, status
        assert "labeller reads 'large green square top-left'" in status, status
        assert "--mask mask.png" in page.value("restore-command")
        anchors = driver.find_elements(page.By.CSS_SELECTOR, "#restore-files a[download]")
        links = {a.get_attribute("download"): a.get_attribute("href") for a in anchors}
        assert set(links) == {"restored.png", "mask.png"}, links
        mask_link = links["mask.png"]
        with urllib.request.urlopen(mask_link, timeout=10) as r:
            (tmp_path / "mask.png").write_bytes(r.read())
        mask = np.asarray(Image.open(tmp_path / "mask.png").convert("L")) > 127
        assert mask.shape == (32, 32) and mask[2:14, 2:14].all(), mask.astype(int)  # the quarter painted
        assert not mask[20:].any() and not mask[:, 20:].any(), mask.astype(int)  # and nothing else
        page.screenshot(shots / "restore.png")
        timings["restore"] = time.monotonic() - t0

        # ---- bad inputs: one line each, the app keeps working -----------------------------------------
        t0 = time.monotonic()
        page.css("#restore-task input[value=sr]").click()
        status = page.run("restore")
        assert status.startswith("error: --task sr needs a square low-resolution image"), status  # 4
        page.tab("Compare")
        page.type("compare-rows", "--solver ddim --steps 8\n--seed 3")
        assert "--seed is set above the settings" in page.run("compare")  # 5
        page.type("compare-rows", "--solver ddim --steps 8")
        assert page.run("compare").startswith("error: a comparison needs 2 to 8 settings")  # 6
        page.tab("Sample")
        bad = [
            ("sample-prompt", "", "--prompt is empty"),  # 7
            ("sample-prompt", "large purple hexagon", "purple"),  # 8
            ("sample-steps", 0, "--steps must be an integer"),  # 9
            ("sample-n", 100, "--n must be an integer in [1, 16]"),  # 10
            ("sample-pipeline", str(tmp_path), "is not a diffusers pipeline folder"),  # 11
        ]
        good = {"sample-prompt": PROMPT, "sample-steps": STEPS, "sample-n": 4, "sample-pipeline": ""}
        for elem_id, value, needle in bad:
            page.type(elem_id, value)
            status = page.run("sample")
            assert status.startswith("error: ") and needle in status and "Traceback" not in status, status
            assert "\n" not in status
            page.type(elem_id, good[elem_id])
        page.css("#sample-guidance button").click()  # open the guidance accordion
        time.sleep(0.3)
        page.type("sample-ag", 0.9)
        page.type("sample-rescale", 0.5)
        status = page.run("sample")
        assert status.startswith("error: ") and "--ag" in status and "--cfg-rescale" in status, status  # 12
        page.type("sample-ag", "")
        page.type("sample-rescale", "")
        page.type("sample-seed", 2)
        status = page.run("sample")
        assert status.startswith(f"done: 4 images, {STEPS} NFE"), status  # the app still works
        timings["12 bad inputs"] = time.monotonic() - t0

        # ---- four sampling requests at once ----------------------------------------------------------
        t0 = time.monotonic()
        rss_before = rss_mb(server.proc.pid)
        first = driver.current_window_handle
        windows = [first]
        for _ in range(3):
            driver.switch_to.new_window("tab")
            driver.get(server.url)
            windows.append(driver.current_window_handle)
        befores = []
        for k, handle in enumerate(windows):
            driver.switch_to.window(handle)
            page.loaded()
            page.type("sample-steps", STEPS)
            page.type("sample-seed", 10 + k)
            befores.append(page.text("sample-status"))
        for handle in windows:  # four clicks in a row: the queue holds three while one computes
            driver.switch_to.window(handle)
            page.css("#sample-run").click()
        for k, handle in enumerate(windows):
            driver.switch_to.window(handle)
            status = page.wait_status("sample", befores[k], limit=60)
            assert status.startswith(f"done: 4 images, {STEPS} NFE"), (k, status)
            assert f"--seed {10 + k} " in page.value("sample-command")
        for handle in windows[1:]:
            driver.switch_to.window(handle)
            driver.close()
        driver.switch_to.window(first)
        timings["4 at once"] = time.monotonic() - t0
        rss_after = rss_mb(server.proc.pid)
        timings["server RSS MB before 4 at once"] = rss_before
        timings["server RSS MB after 4 at once"] = rss_after
        # bounded memory: the queue holds requests, not results; four runs of four 32x32 images and their
        # previews take well under a megabyte, so growth beyond allocator noise would be a leak
        assert rss_after - rss_before < 64, (rss_before, rss_after)

        # ---- stop a long run -------------------------------------------------------------------------
        t0 = time.monotonic()
        page.type("sample-steps", 5000)
        page.type("sample-n", 1)
        before = page.text("sample-status")
        page.css("#sample-run").click()
        deadline = time.monotonic() + 30
        while not re.search(r"step (\d{2,}) of 5000", page.text("sample-frames")):
            assert time.monotonic() < deadline, page.text("sample-frames")
            time.sleep(0.1)
        page.css("#sample-stop").click()
        status = page.wait_status("sample", before, limit=10)
        assert status.startswith("stopped"), status
        page.type("sample-steps", STEPS)
        page.type("sample-seed", 3)
        status = page.run("sample", limit=20)  # the stopped run let go of the compute slot
        assert status.startswith(f"done: 1 image, {STEPS} NFE"), status
        timings["stop"] = time.monotonic() - t0
    except BaseException:
        server.stop()  # a failed walk leaves no server behind
        raise
    finally:
        if driver is not None:
            driver.quit()

    # ---- Ctrl-C --------------------------------------------------------------------------------------------
    server.proc.send_signal(signal.SIGINT)
    try:
        code = server.proc.wait(20)
    finally:
        server.stop()
    time.sleep(0.2)
    err = "".join(server.err)
    assert code == 130, (code, err[-2000:])
    assert err.strip().splitlines()[-1] == "error: interrupted (SIGINT): the web app stopped (it keeps no files)", err
    assert "Traceback" not in err, err
    timings["total"] = time.monotonic() - t_start
    print("browser test timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print(f"preview frames seen in the page: {len(steps_seen)} for {STEPS} steps; screenshots in {shots}")
