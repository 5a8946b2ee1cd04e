"""`hwr serve` as a real process on a free loopback port: the page in headless Chromium (Debian's chromium
and chromium-driver, driven by Selenium), and SIGTERM in the middle of a burst of requests.

HWR_SCREENSHOT=path.png saves a screenshot of the page after the digit is drawn."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, env, one_error_line, run, wait_for
from paper_images import paper_row, write_paper_digits
from PIL import Image, ImageDraw

from hwr_dist.data import load_dataset

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SEVEN = [[(-70, -85), (70, -85)], [(70, -85), (-25, 95)]]  # strokes, from the canvas's centre


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m hwr_dist.cli serve MODEL` in its own process, this checkout's code, stderr to a file."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.port, self.log = free_port(), log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "hwr_dist.cli", "serve", str(model),
                                          "--port", str(self.port), *args], cwd=ROOT, stdout=err, stderr=err,
                                         env=env(PYTHONPATH=str(ROOT)))
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: self.proc.poll() is not None or self.healthy(), 90, poll=0.2)
        assert self.healthy(), log.read_text()[-3000:]

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None,
                ctype: str = "image/png") -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": ctype} if body is not None else {})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def run_dir(default_run):
    return default_run[0]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    s = Server(run_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def settle(driver) -> None:
    """Wait until the page has no request in flight and shows an answer (or an error)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: d.execute_script(
        "return document.body.dataset.inflight === '0' && document.body.dataset.state !== 'idle'"))


def shown(driver) -> dict:
    return driver.execute_script("""
        const a = document.getElementById('answer');
        return {state: document.body.dataset.state, prediction: a.dataset.prediction,
                bars: [...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.character, b.dataset.class,
                                                                            Number(b.dataset.probability)]),
                inputs: [...document.querySelectorAll('#inputs img')].map(i => i.src),
                latency: document.getElementById('latency').textContent,
                error: document.getElementById('error').textContent};""")


def expected_bars(answer: dict) -> list:
    groups = answer.get("characters") or [answer["top"]]
    return [[str(i), c["class"], c["probability"]] for i, top in enumerate(groups) for c in top]


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: "fast_cnn" in d.find_element("id", "model").text)


def draw(driver, strokes, kinds=("mouse", "pen")) -> None:
    """Each stroke as real pointer events (down, moves, up), alternating mouse and pen."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = driver.find_element("id", "pad")
    for n, ((x0, y0), (x1, y1)) in enumerate(strokes):
        kind = kinds[n % len(kinds)]
        pointer = PointerInput(interaction.POINTER_PEN if kind == "pen" else interaction.POINTER_MOUSE, kind)
        actions = ActionBuilder(driver, mouse=pointer, duration=16)  # ms per move: one event per frame
        actions.pointer_action.move_to(canvas, x0, y0).pointer_down()
        for t in np.linspace(0, 1, 12)[1:]:
            actions.pointer_action.move_to(canvas, round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0)))
        actions.pointer_action.pointer_up()
        actions.perform()


def test_draw_a_digit(browser, server):
    open_page(browser, server.url)
    draw(browser, SEVEN)
    settle(browser)
    page = shown(browser)
    assert page["state"] == "done", page
    png = base64.b64decode(browser.execute_script(
        "return document.getElementById('pad').toDataURL('image/png')").split(",", 1)[1])
    status, api = server.request("POST", "/v1/predict?include_input=true", png)
    assert status == 200, api
    assert page["prediction"] == api["prediction"] == "7", (page, api)
    assert page["bars"] == expected_bars(api) and len(page["bars"]) == 3
    assert page["inputs"] == api["input"]  # the 28x28 image shown is the one the model received
    assert re.search(r"server \d+\.\d ms, round trip \d+\.\d ms", page["latency"]), page
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(server.url) or u.startswith(("data:", "blob:")) for u in loaded), loaded
    if os.environ.get("HWR_SCREENSHOT"):
        browser.save_screenshot(os.environ["HWR_SCREENSHOT"])

    browser.find_element("id", "clear").click()
    assert shown(browser)["state"] == "idle" and not shown(browser)["bars"]


def test_upload_a_photo_and_a_number(browser, server, tmp_path):
    test = load_dataset("mnist-sample", ".").test
    (photo, _), = write_paper_digits(test.images[5:6].numpy(), test.labels[5:6].tolist(), tmp_path, seed=4)
    open_page(browser, server.url)
    browser.find_element("id", "file").send_keys(str(photo))
    settle(browser)
    page = shown(browser)
    status, api = server.request("POST", "/v1/predict", photo.read_bytes(), "image/jpeg")
    assert status == 200 and page["state"] == "done", (api, page)
    assert page["prediction"] == api["prediction"] and page["bars"] == expected_bars(api)
    assert browser.find_element("id", "photo").is_displayed()

    row = tmp_path / "row.png"  # number mode: a row of digits, read with the --segment path
    paper_row([test.images[i].numpy() for i in range(20, 24)], np.random.default_rng(5)).save(row)
    browser.find_element("css selector", "input[name=mode][value=number]").click()
    browser.find_element("id", "file").send_keys(str(row))
    settle(browser)
    page = shown(browser)
    status, api = server.request("POST", "/v1/predict?segment=true", row.read_bytes())
    assert status == 200 and page["prediction"] == api["prediction"] and len(api["prediction"]) == 4, (page, api)
    assert page["bars"] == expected_bars(api) and len(page["inputs"]) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_port_in_use_is_one_error_line(server, run_dir, workers):
    proc = run([sys.executable, "-m", "hwr_dist.cli", "serve", str(run_dir), "--port", str(server.port),
                "--workers", str(workers)], PYTHONPATH=str(ROOT), timeout=120)
    assert proc.returncode == 2 and f"port {server.port} on 127.0.0.1 is already in use" in one_error_line(proc)
    assert server.healthy()  # the first one serves on


def burst_image() -> bytes:
    """A 600x600 photo-like digit: enough preprocessing that requests are in flight when SIGTERM comes."""
    img = Image.new("L", (600, 600), 220)
    ImageDraw.Draw(img).line([(150, 120), (450, 120), (260, 500)], fill=30, width=40)
    noisy = np.asarray(img, np.float64) + np.random.default_rng(0).normal(0, 6, (600, 600))
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_sigterm_drains_in_flight_requests(run_dir, tmp_path):
    server = Server(run_dir, tmp_path / "server.log")
    body, outcomes, lock, stop = burst_image(), [], threading.Lock(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, answer = server.request("POST", "/v1/predict", body)
                outcome = (status, answer.get("prediction"), time.monotonic())
            except ConnectionRefusedError:
                return  # the port is closed: the server accepts nothing new
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
                outcome = ("not accepted", type(e).__name__, time.monotonic())  # closed before it was read
            except Exception as e:  # noqa: BLE001 - anything else is a failure, reported below
                outcome = ("failed", repr(e), time.monotonic())
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) >= 30, 30)
    killed = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(30)
    log = server.log.read_text()
    assert code == 0, log[-3000:]
    answered = [o for o in outcomes if o[0] == 200]
    assert all(o[0] in (200, "not accepted") for o in outcomes), [o for o in outcomes if o[0] != 200][:5]
    assert all(o[1] == answered[0][1] for o in answered)  # real answers, the same image each time
    assert any(o[2] > killed for o in answered), "no request was answered after SIGTERM: nothing was drained"
    m = re.search(r"answered (\d+) API requests, (\d+) in flight", log)
    assert m, log[-3000:]
    # every request the server accepted was answered, and every answer reached its client
    assert int(m.group(1)) == len(answered) and m.group(2) == "0", (m.group(0), len(answered), len(outcomes))
