"""The merge explorer works in a real JupyterLab in a real browser.

JupyterLab starts on loopback (a free port, a token, temporary config/runtime/settings
folders, a copy of the notebook); Debian's chromium, driven by Playwright, opens notebook 01,
runs all cells, drags the threshold slider of the merge explorer and waits for the shown token
count and the merge-map picture to change. Screenshots are kept in ``tests/artifacts/``.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it).
Without it the test is skipped on a developer machine and fails under CI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
EXPLORER = ".dymu-merge-explorer"
RUN_TIMEOUT_MS = 240_000  # kernel start + every cell of notebook 01 on a slow 2-core CPU

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run must `apt-get install -y chromium` before the tests")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    """Poll the server's status API until it answers; fail with its log if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@dataclass
class Lab:
    base: str
    token: str

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"

    def kernel_ready(self) -> bool:
        """True once the notebook's kernel is started, connected to the page and idle."""
        with urllib.request.urlopen(self.url("api/sessions"), timeout=5) as response:
            sessions = json.load(response)
        return any(s["path"] == NOTEBOOK.name and s["kernel"]["execution_state"] == "idle"
                   and s["kernel"]["connections"] > 0 for s in sessions)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A JupyterLab serving a copy of notebook 01."""
    root, config = tmp_path / "root", tmp_path / "config"
    root.mkdir()
    shutil.copy(NOTEBOOK, root)
    (config / "labconfig").mkdir(parents=True)  # no news pop-up, no update check
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    port, token = free_port(), secrets.token_hex(16)
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
             *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token)
    try:
        wait_until_answering(lab.url("api/status"), proc, log)
        yield lab
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End the server's process group (the server and the kernels it started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cell_errors(page) -> str:
    """Text of the error outputs in the notebook (for a readable failure)."""
    return "\n".join(page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                     .all_inner_texts())[-3000:]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_merge_explorer_responds_in_jupyterlab(lab: Lab) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(lab.url(f"lab/tree/{NOTEBOOK.name}"))
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
            wait_for(lab.kernel_ready, 90, "the notebook's kernel")  # else "Run All" asks for a kernel
            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
            try:
                page.wait_for_selector(f"{EXPLORER} .dymu-count", timeout=RUN_TIMEOUT_MS)
            except PlaywrightTimeout:
                pytest.fail(f"the merge explorer never appeared; cell errors:\n{cell_errors(page)}")
            explorer = page.locator(EXPLORER)
            explorer.scroll_into_view_if_needed()
            count = page.inner_text(f"{EXPLORER} .dymu-count")
            picture = page.get_attribute(f"{EXPLORER} img.dymu-map", "src")
            assert int(count) > 0 and picture

            handle = page.locator(f"{EXPLORER} .dymu-scale .noUi-handle")
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 70, box["y"] + box["height"] / 2, steps=8)
            page.mouse.up()

            page.wait_for_function(
                "([sel, old]) => { const e = document.querySelector(sel); return e && e.textContent !== old; }",
                arg=[f"{EXPLORER} .dymu-count", count], timeout=60_000)
            page.wait_for_function(
                "([sel, old]) => { const e = document.querySelector(sel); return e && e.src !== old; }",
                arg=[f"{EXPLORER} img.dymu-map", picture], timeout=60_000)
            moved = page.inner_text(f"{EXPLORER} .dymu-scale .widget-readout")
            assert float(moved) > 1.0, f"the slider did not move right (readout {moved})"
            assert int(page.inner_text(f"{EXPLORER} .dymu-count")) < int(count)  # looser thresholds merge more
            explorer.screenshot(path=str(ARTIFACTS / "merge_explorer.png"))
        finally:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_notebook01.png"))
            browser.close()
