"""Helpers of ``tests/test_browser.py``: a JupyterLab server in a subprocess and a headless
Chromium driven by selenium, with the JavaScript that reads the notebook's state.

Kept apart from the test module so that the test reads as the user's steps (open, run all, move
a slider, compare) while the plumbing (ports, tokens, process groups, DOM queries) lives here."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = {
    "chromium": "apt-get install chromium",
    "chromedriver": "apt-get install chromium-driver",
    "selenium": "pip install selenium",
    "jupyterlab": "pip install jupyterlab",
}
"""What provides each prerequisite of the browser test (Debian packages, PyPI packages)."""

REQUIRE_ENV = "CIP_REQUIRE_BROWSER"
"""``CIP_REQUIRE_BROWSER=1`` (set by ``.ci/run`` after it installed chromium): a missing
prerequisite fails the test instead of skipping it."""


def find_chromium() -> str | None:
    """Path of a Chromium binary (Debian: ``/usr/bin/chromium``), or ``None``."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def find_chromedriver() -> str | None:
    """Path of chromedriver (Debian's chromium-driver: ``/usr/bin/chromedriver``), or ``None``."""
    return shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver",) if os.access(p, os.X_OK)), None)


def missing_prerequisites() -> list[str]:
    """Each missing prerequisite as ``"<name> (install: <command>)"``; empty when all are there."""
    missing = []
    if find_chromium() is None:
        missing.append("chromium")
    if find_chromedriver() is None:
        missing.append("chromedriver")
    for module in ("selenium", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            missing.append(module)
    return [f"{name} (install: {INSTALL_HINT[name]})" for name in missing]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
              describe: Callable[[], str] = lambda: "") -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (``TimeoutError`` naming ``what`` and, if given, ``describe()``: the state at that moment)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = describe()
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                               + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


@dataclass
class LabServer:
    """A ``jupyter lab`` subprocess serving ``root_dir`` on ``port`` with ``token``."""

    root_dir: Path
    port: int
    token: str
    log_path: Path
    proc: subprocess.Popen | None = None
    kernel_pids: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, timeout: float = 10.0) -> Any:
        """Call the server's REST API (``/api/...``) with the token; the decoded JSON (or None)."""
        req = urllib.request.Request(f"{self.base_url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's (and its kernels') log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def shutdown_kernels(self) -> None:
        """Shut down every running kernel (a finished notebook's kernel holds models and threads)."""
        self._remember_kernel_pids()
        with contextlib.suppress(OSError, urllib.error.URLError):
            for session in self.api("GET", "/api/sessions") or []:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.api("DELETE", f"/api/sessions/{session['id']}", timeout=30)

    def _remember_kernel_pids(self) -> None:
        """Record the server's child processes (its kernels: jupyter_client starts each in a
        session of its own, so stopping the server's process group does not reach them)."""
        if self.proc is None:
            return
        try:
            import psutil
        except ImportError:  # without psutil the kernels still exit when their parent dies
            return
        with contextlib.suppress(psutil.Error):
            self.kernel_pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}


def start_lab(root_dir: Path, env: dict[str, str], log_path: Path, timeout: float = 120.0) -> LabServer:
    """Start ``python -m jupyterlab`` on a free port with a random token, serving ``root_dir``
    with environment ``env`` (kernels inherit it); return once ``/api/status`` answers.

    ``window.jupyterapp`` is exposed (``LabApp.expose_app_in_browser``) so that the test can run
    JupyterLab commands and read kernel states; settings and workspaces live in ``root_dir``'s
    sibling folders, so neither the user's JupyterLab settings nor a saved workspace interfere."""
    server = LabServer(root_dir=root_dir, port=free_port(), token=secrets.token_hex(16), log_path=log_path)
    state = root_dir.parent / f"{root_dir.name}-jupyter-state"
    for sub in ("settings", "workspaces", "runtime", "config", "data"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    env = {**env, "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "JUPYTER_CONFIG_DIR": str(state / "config"),
           "JUPYTER_DATA_DIR": str(state / "data")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={server.port}",
           "--port-retries=0", f"--ServerApp.token={server.token}", f"--ServerApp.root_dir={root_dir}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",  # no news fetch
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = log_path.open("w")
    try:  # a session of its own: the teardown stops the server and anything it forked by group
        server.proc = subprocess.Popen(cmd, env=env, cwd=root_dir, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    finally:
        log.close()

    def ready() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {server.proc.returncode}:\n{server.log_tail()}")
        try:
            return server.api("GET", "/api/status", timeout=5) is not None
        except (OSError, urllib.error.URLError, ValueError):
            return False

    try:
        wait_for(ready, timeout, "jupyter lab to answer /api/status", interval=0.5, describe=server.log_tail)
    except BaseException:
        stop_lab(server)
        raise
    return server


def stop_lab(server: LabServer, grace: float = 20.0) -> None:
    """Shut down the kernels and the server, then SIGTERM / SIGKILL whatever is left of the
    server's process group and of the kernels it started (by their recorded process ids)."""
    proc = server.proc
    if proc is None:
        return
    if proc.poll() is None:
        server.shutdown_kernels()
        with contextlib.suppress(OSError, urllib.error.URLError):
            server.api("POST", "/api/shutdown", timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    for pid in server.kernel_pids:  # normally gone already: shut down above, or exited with their parent
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def chromium_driver(window: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A headless Chromium (selenium's ``webdriver.Chrome`` on Debian's chromium and
    chromedriver; no driver download) that records the browser console; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_chromium() or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={window[0]},{window[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=find_chromedriver()), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_log(driver: Any, last: int = 30) -> str:
    """The browser console's last ``last`` entries, one a line (for failure messages)."""
    try:
        entries = driver.get_log("browser")
    except Exception as exc:  # noqa: BLE001 - a failure message must not fail itself
        return f"(browser console unavailable: {exc})"
    return "\n".join(f"  {e.get('level')}: {e.get('message')}" for e in entries[-last:]) or "  (empty)"


def number(text: str | None) -> float | None:
    """``float(text)``, or ``None`` for a missing or unparsable text (a readout being edited)."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def sha(text: str | None) -> str | None:
    """Short sha256 of ``text`` (an image's data URL), ``None`` for ``None``."""
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


# --- JavaScript run in the page ----------------------------------------------------------------

JS_PANEL = """
const app = window.jupyterapp;
if (!app) { return null; }
const panel = Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === arguments[0]);
"""
"""Prefix: ``panel`` = the open notebook panel of path ``arguments[0]`` (or return null)."""

JS_KERNEL_STATE = JS_PANEL + """
if (!panel || !panel.context.isReady || !panel.sessionContext.isReady) { return null; }
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
if (!kernel) { return null; }
const cells = panel.content.widgets.filter(c => c.model.type === 'code');
return {status: kernel.status, connection: kernel.connectionStatus, cells: cells.length,
        executed: cells.filter(c => c.model.executionCount !== null).length};
"""
"""The kernel's status and how many code cells have an execution count."""

JS_RUN_ALL = JS_PANEL + """
app.shell.activateById(panel.id);
window.__cipRunAll = {done: false, ok: null, error: null};
app.commands.execute('notebook:run-all-cells').then(
    ok => { window.__cipRunAll = {done: true, ok: ok !== false, error: null}; },
    err => { window.__cipRunAll = {done: true, ok: false, error: String(err)}; });
return true;
"""
"""Start JupyterLab's "Run > Run All Cells" on the panel; the outcome lands in ``__cipRunAll``."""

JS_ERRORS = JS_PANEL + """
if (!panel) { return []; }
return Array.from(panel.node.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'))
    .map(n => n.innerText.slice(-1500));
"""
"""Texts of the error / stderr outputs in the notebook (for failure messages)."""

JS_FIND_SLIDER = JS_PANEL + """
if (!panel) { return null; }
const spec = arguments[1];
for (const slider of panel.node.querySelectorAll('.widget-slider')) {
    const label = slider.querySelector('.widget-label');
    const text = label ? label.textContent.trim() : '';
    if (spec.prefixes.some(p => text.startsWith(p)) || spec.contains.some(c => text.toLowerCase().includes(c))) {
        return slider;
    }
}
return null;
"""
"""The first slider whose description starts with one of ``arguments[1].prefixes`` or contains
(case-insensitively) one of ``arguments[1].contains``."""

JS_SLIDER_STATE = """
const slider = arguments[0];
const box = slider.closest('.widget-interact');
const handle = slider.querySelector('.noUi-handle');
const readout = slider.querySelector('.widget-readout');
const label = slider.querySelector('.widget-label');
const out = box ? box.querySelector('.widget-output') : null;
let table = null;
const t = out ? out.querySelector('table') : null;
if (t) {
    const header = Array.from(t.querySelectorAll('thead tr:last-child th')).map(th => th.textContent.trim());
    const rows = {};
    for (const tr of t.querySelectorAll('tbody tr')) {
        const name = tr.querySelector('th') ? tr.querySelector('th').textContent.trim() : '';
        rows[name] = Array.from(tr.querySelectorAll('td')).map(td => parseFloat(td.textContent));
    }
    table = {header: header.filter(h => h !== ''), rows: rows};
}
const img = out ? out.querySelector('img') : null;
const texts = out ? Array.from(out.querySelectorAll('.jp-RenderedText')).map(n => n.innerText) : [];
return {label: label ? label.textContent.trim() : null,
        readout: readout ? readout.textContent.trim() : null,
        handle: handle ? handle.getAttribute('aria-valuenow') : null,
        img: img ? img.getAttribute('src') : null,
        table: table, text: texts.join('\\n'),
        output: out ? out.innerText.slice(-2000) : null};
"""
"""State of one slider of an ``interactive``: label, readout, handle position, and its output
area (the figure's data URL, the parsed HTML table, printed text)."""

JS_STATIC_TABLE = JS_PANEL + """
if (!panel) { return null; }
for (const t of panel.node.querySelectorAll('.jp-OutputArea-output table')) {
    if (t.closest('.widget-output')) { continue; }
    const header = Array.from(t.querySelectorAll('thead tr:last-child th')).map(th => th.textContent.trim());
    if (!header.includes(arguments[1])) { continue; }
    const rows = {};
    for (const tr of t.querySelectorAll('tbody tr')) {
        const name = tr.querySelector('th') ? tr.querySelector('th').textContent.trim() : '';
        rows[name] = Array.from(tr.querySelectorAll('td')).map(td => parseFloat(td.textContent));
    }
    return {header: header.filter(h => h !== ''), rows: rows};
}
return null;
"""
"""The first table outside any widget whose header has the column ``arguments[1]`` (parsed)."""


class NotebookPage:
    """One notebook open in JupyterLab in ``driver``: open, run all, find and move a slider, read
    the slider's output. Every wait is bounded; a timeout names what it waited for and the
    notebook's state (kernel, error outputs, browser console, server log)."""

    def __init__(self, driver: Any, server: LabServer, path: str) -> None:
        self.driver, self.server, self.path = driver, server, path
        self.timings: dict[str, float] = {}

    # -- diagnostics
    def context(self, slider: Any = None) -> str:
        """The notebook's state for a failure message."""
        parts = [f"notebook {self.path}: kernel {self.js(JS_KERNEL_STATE)}"]
        errors = self.js(JS_ERRORS)
        if isinstance(errors, list) and errors:
            parts.append("error/stderr outputs:\n" + "\n---\n".join(errors[-3:]))
        if slider is not None:
            with contextlib.suppress(Exception):
                state = self.state(slider)
                parts.append(f"slider {state['label']!r} readout {state['readout']!r} handle {state['handle']!r}; "
                             f"its output:\n{state['output']}")
        parts.append("browser console:\n" + console_log(self.driver))
        parts.append("server log (end):\n" + self.server.log_tail(1500))
        return "\n".join(parts)

    def js(self, script: str, *args: Any) -> Any:
        """Run one of the ``JS_*`` scripts on this notebook (``arguments[0]`` = its path, then
        ``args``); a failing script gives its error as a string, for polling and messages."""
        try:
            return self.driver.execute_script(script, self.path, *args)
        except Exception as exc:  # noqa: BLE001 - polled; the caller's timeout reports the state
            return f"(script failed: {type(exc).__name__}: {str(exc)[:200]})"

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.monotonic() - start, 1)

    # -- steps
    def open(self, timeout: float = 180.0) -> None:
        """Load JupyterLab with this notebook (fresh workspace) and wait until its kernel is idle."""
        start = time.monotonic()
        self.driver.get(f"{self.server.base_url}/lab/tree/{self.path}?reset&token={self.server.token}")

        def idle() -> bool:
            state = self.js(JS_KERNEL_STATE)
            return isinstance(state, dict) and state["status"] == "idle" and state["connection"] == "connected"

        wait_for(idle, timeout, f"{self.path} to open with an idle kernel", describe=self.context)
        self._timed("open", start)

    def run_all(self, timeout: float) -> None:
        """Run > Run All Cells (the JupyterLab command) and wait until every code cell has run and
        the kernel is idle; a failing cell fails here with its error output."""
        start = time.monotonic()
        assert self.js(JS_RUN_ALL) is True, f"could not start Run All Cells\n{self.context()}"

        def finished() -> bool:
            outcome = self.driver.execute_script("return window.__cipRunAll || null;")
            state = self.js(JS_KERNEL_STATE)
            return bool(outcome and outcome["done"] and isinstance(state, dict) and state["status"] == "idle"
                        and (not outcome["ok"] or state["executed"] == state["cells"]))

        wait_for(finished, timeout, f"Run All Cells of {self.path}", interval=1.0, describe=self.context)
        self._timed("run_all", start)
        outcome = self.driver.execute_script("return window.__cipRunAll;")
        assert outcome["ok"], f"Run All Cells of {self.path} stopped at a failing cell ({outcome})\n{self.context()}"

    def slider(self, label: dict[str, list[str]], what: str, timeout: float = 60.0) -> Any:
        """The slider whose description matches ``label`` (:data:`JS_FIND_SLIDER`)."""
        found = wait_for(lambda: self.js(JS_FIND_SLIDER, label) or None, timeout,
                         f"the {what} slider (description {label}) in {self.path}", describe=self.context)
        if isinstance(found, str):  # the script itself failed
            raise AssertionError(f"finding the {what} slider failed: {found}\n{self.context()}")
        return found

    def state(self, slider: Any) -> dict:
        """:data:`JS_SLIDER_STATE` of ``slider`` plus ``img_sha`` (short hash of the figure)."""
        state = self.driver.execute_script(JS_SLIDER_STATE, slider)
        state["img_sha"] = sha(state["img"])
        return state

    def set_value(self, slider: Any, value: float) -> None:
        """Move ``slider`` to ``value`` the way a user types it: click the slider's editable
        readout, select its text, type the value and press Enter. The widget then sets its value
        (and the handle moves) once, as with ``continuous_update=False`` a drag would on release."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
        readout.click()
        self.driver.execute_script(
            "arguments[0].focus(); window.getSelection().selectAllChildren(arguments[0]);", readout)
        ActionChains(self.driver).send_keys(f"{value:g}").send_keys(Keys.ENTER).perform()

    def wait_for_update(self, slider: Any, value: float, before: dict, need_table: bool,
                        timeout: float = 120.0) -> dict:
        """Wait until the slider shows ``value`` (readout and handle), its output holds a new
        figure (and a table if ``need_table``) and the kernel is idle; return the new state."""
        start = time.monotonic()

        def updated() -> dict | None:
            state = self.state(slider)
            kernel = self.js(JS_KERNEL_STATE)
            # the readout is exact; the handle's aria-valuenow is rounded to one decimal by the
            # slider library (0.75 reads "0.8"), so it is checked to that precision
            shown = all(number(state[key]) is not None and abs(number(state[key]) - value) <= tol
                        for key, tol in (("readout", 1e-9), ("handle", 0.05 + 1e-9)))
            done = (shown and state["img_sha"] not in (None, before["img_sha"])
                    and (state["table"] is not None or not need_table)
                    and isinstance(kernel, dict) and kernel["status"] == "idle")
            return state if done else None

        state = wait_for(updated, timeout, f"the output of {self.path}'s slider to change after moving it to "
                         f"{value:g} (figure before: {before['img_sha']})", describe=lambda: self.context(slider))
        self.timings[f"update to {value:g}"] = round(time.monotonic() - start, 1)
        return state

    def move(self, slider: Any, value: float, before: dict, need_table: bool) -> dict:
        """:meth:`set_value` then :meth:`wait_for_update`; the slider's new state."""
        self.set_value(slider, value)
        return self.wait_for_update(slider, value, before, need_table)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Re-raise a selenium/JavaScript error inside as an ``AssertionError`` that carries
        :meth:`context` (assertions and timeouts already carry it)."""
        try:
            yield
        except (AssertionError, TimeoutError):
            raise
        except Exception as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}\n{self.context()}") from exc
