#!/usr/bin/env python3
"""Drives Debian's headless Chromium through one scenario against a URL and prints a JSON
report, for previewd's browser tests (tests/it/browser.rs).

    drive.py SCENARIO URL --screenshot PATH [--timeout SECONDS]

Scenarios: jupyter (create a notebook, run 21*2, see 42), streamlit (its /_stcore/stream
WebSocket up, a text input round trip), gradio (a result delivered over server-sent events),
page (testapp's /page opened top-level: its script, stylesheet, XHR and WebSocket load) and
iframe (the same page embedded in an <iframe> of a page served here from 127.0.0.1, which is
cross-site to *.preview.localhost).

The report: each step's success, the seconds from the first navigation to "UI usable", the
requests that failed (HTTP status >= 400, or a network error other than a cancellation), the
WebSockets and event streams seen, the console errors (Chromium's browser log at SEVERE, minus
the "Failed to load resource" lines that repeat a failed request), the page's text when a step
fails, and a screenshot. Chromium aborts loads with ERR_NETWORK_CHANGED when a container starts
or stops (a network interface appears or goes); an attempt that saw that is retried with a
fresh browser, and only that.

Nothing is downloaded: Chromium and chromedriver are Debian's (/usr/bin), selenium is given
the driver's path so Selenium Manager never runs.
"""

import argparse
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("PREVIEWD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PREVIEWD_CHROMEDRIVER", "/usr/bin/chromedriver")
NETWORK_CHANGED = "ERR_NETWORK_CHANGED"
ATTEMPTS = 4


class StepFailed(Exception):
    """A scenario step that did not reach its condition."""


def browser(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [
        "--headless=new",
        "--no-sandbox",  # the tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Everything the tests open is local: no proxy from the environment in between.
        "--no-proxy-server",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class Log:
    """What Chromium's performance and browser logs said, gathered as the scenario runs."""

    def __init__(self):
        self.requests = {}  # requestId -> url
        self.failed = []
        self.websockets = {}  # requestId -> {"url", "status"}
        self.event_streams = []
        self.console_errors = []
        self.network_changed = False

    def drain(self, driver):
        for entry in driver.get_log("performance"):
            try:
                msg = json.loads(entry["message"])["message"]
            except (KeyError, ValueError):
                continue
            self.network_event(msg.get("method", ""), msg.get("params", {}))
        for entry in driver.get_log("browser"):
            if entry.get("level") != "SEVERE":
                continue
            text = entry.get("message", "")
            if entry.get("source") == "network" and "Failed to load resource" in text:
                continue  # the same failure is in `failed`, with its URL and status
            self.console_errors.append(text)
            if NETWORK_CHANGED in text:
                self.network_changed = True

    def network_event(self, method, p):
        rid = p.get("requestId")
        if method == "Network.requestWillBeSent":
            self.requests[rid] = p.get("request", {}).get("url", "")
        elif method == "Network.responseReceived":
            r = p.get("response", {})
            if r.get("status", 0) >= 400:
                self.failed.append(
                    {"url": r.get("url"), "status": r.get("status"), "type": p.get("type")}
                )
            if "text/event-stream" in (r.get("mimeType") or ""):
                self.event_streams.append(r.get("url"))
        elif method == "Network.loadingFailed":
            if rid not in self.requests:
                return  # sent before the scenario began (the browser's new-tab page)
            error = p.get("errorText", "")
            if NETWORK_CHANGED in error:
                self.network_changed = True
            # A cancelled request (navigation away, an app aborting its own fetch) is not a
            # failure, unless the browser blocked it.
            if p.get("canceled") and not p.get("blockedReason") and not p.get("corsErrorStatus"):
                return
            failure = {"url": self.requests[rid], "error": error, "type": p.get("type")}
            for key in ["blockedReason", "corsErrorStatus"]:
                if p.get(key):
                    failure[key] = p[key]
            self.failed.append(failure)
        elif method == "Network.webSocketCreated":
            self.websockets[rid] = {"url": p.get("url"), "status": None}
        elif method == "Network.webSocketHandshakeResponseReceived":
            ws = self.websockets.setdefault(rid, {"url": "?", "status": None})
            ws["status"] = p.get("response", {}).get("status")
        elif method == "Network.webSocketFrameError":
            ws = self.websockets.setdefault(rid, {"url": "?", "status": None})
            ws["error"] = p.get("errorMessage")

    def websockets_failed(self):
        return [ws for ws in self.websockets.values() if ws.get("status") != 101]


class Run:
    """One attempt at a scenario: steps, timings, logs."""

    def __init__(self, driver, timeout):
        self.driver = driver
        self.timeout = timeout
        self.log = Log()
        self.steps = []
        self.start = time.monotonic()
        self.usable_s = None

    def step(self, name, action):
        t = time.monotonic()
        try:
            detail = action()
            self.steps.append(
                {"name": name, "ok": True, "s": round(time.monotonic() - t, 2), "detail": detail}
            )
        except Exception as e:  # one failed step ends the scenario; the report says why
            self.log.drain(self.driver)
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if NETWORK_CHANGED in str(e):
                self.log.network_changed = True
            self.steps.append(
                {"name": name, "ok": False, "s": round(time.monotonic() - t, 2), "detail": message}
            )
            raise StepFailed(name) from e
        self.log.drain(self.driver)

    def usable(self):
        self.usable_s = round(time.monotonic() - self.start, 2)

    def wait(self, condition, what, timeout=None):
        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.2).until(
                condition
            )
        except WebDriverException as e:
            raise StepFailed(f"timed out waiting for {what}") from e

    def open(self, url):
        self.driver.get(url)
        return self.driver.current_url


def visible(css):
    return EC.visibility_of_element_located((By.CSS_SELECTOR, css))


def jupyter(run, url):
    d = run.driver
    run.step("open", lambda: run.open(url))
    card = '.jp-LauncherCard[data-category="Notebook"]'
    run.step("launcher", lambda: run.wait(EC.element_to_be_clickable((By.CSS_SELECTOR, card)), "the launcher's notebook card") and None)
    run.usable()
    run.step("new notebook", lambda: d.find_element(By.CSS_SELECTOR, card).click())

    def kernel_idle():
        # The status bar reads "Python 3 (ipykernel) | Idle" once the kernel is up.
        run.wait(
            lambda d: re.search(r"ipykernel\) \| Idle", d.find_element(By.ID, "jp-main-statusbar").text),
            "the kernel to be idle",
        )

    run.step("kernel idle", kernel_idle)

    def execute():
        editor = run.wait(visible(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content"), "a cell editor")
        editor.click()
        editor.send_keys("21*2")
        editor.send_keys(Keys.SHIFT, Keys.ENTER)

    run.step("type 21*2 and run", execute)

    def output():
        out = run.wait(
            lambda d: next(
                (
                    e
                    for e in d.find_elements(
                        By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output"
                    )
                    if e.text.strip()
                ),
                None,
            ),
            "an output",
        )
        if out.text.strip() != "42":
            raise StepFailed(f"output is {out.text!r}")
        return out.text.strip()

    run.step("output 42", output)


def streamlit(run, url):
    d = run.driver
    run.step("open", lambda: run.open(url))
    box = 'input[aria-label="Text to reverse"]'
    run.step("text input", lambda: run.wait(visible(box), "the text input") and None)
    run.usable()

    def websocket():
        run.log.drain(d)
        up = [ws for ws in run.log.websockets.values() if "/_stcore/stream" in (ws["url"] or "") and ws["status"] == 101]
        if not up:
            raise StepFailed(f"no /_stcore/stream WebSocket switched protocols: {list(run.log.websockets.values())}")
        return up[0]["url"]

    run.step("websocket", websocket)

    def round_trip():
        field = d.find_element(By.CSS_SELECTOR, box)
        field.send_keys("previewd", Keys.ENTER)
        run.wait(lambda d: "reversed: dweiverp" in d.find_element(By.TAG_NAME, "body").text, "the reversed text")
        return "reversed: dweiverp"

    run.step("widget round trip", round_trip)


def gradio(run, url):
    d = run.driver
    run.step("open", lambda: run.open(url))
    run.step("button", lambda: run.wait(EC.element_to_be_clickable((By.CSS_SELECTOR, "#multiply")), "the button") and None)
    run.usable()
    run.step("click", lambda: d.find_element(By.CSS_SELECTOR, "#multiply").click())

    def result():
        run.wait(
            lambda d: d.execute_script(
                "const t = document.querySelector('#result textarea, #result input');"
                "return t && t.value === 'product: 42';"
            ),
            "the result",
        )
        return "product: 42"

    run.step("result", result)

    def sse():
        run.log.drain(d)
        if not run.log.event_streams:
            raise StepFailed("no response was an event stream")
        return run.log.event_streams

    run.step("result over SSE", sse)


PROBES = ["script", "stylesheet", "xhr", "websocket"]


def read_probes(run):
    d = run.driver
    run.wait(lambda d: d.find_elements(By.ID, "done"), "the page's probes to finish")
    results = {p: d.find_element(By.ID, f"probe-{p}").text for p in PROBES}
    bad = {p: r for p, r in results.items() if r != "ok"}
    if bad:
        raise StepFailed(f"probes failed: {bad}")
    return results


def page(run, url):
    run.step("open", lambda: run.open(url))
    run.step("probes", lambda: read_probes(run))
    run.usable()


class Embedder(http.server.BaseHTTPRequestHandler):
    """Serves a page that embeds `Embedder.target` in an iframe."""

    target = ""

    def do_GET(self):
        body = (
            "<!doctype html><title>embedder</title><h1>an agent platform</h1>"
            f'<iframe id="preview" src="{self.target}" width="1000" height="600"></iframe>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def frame_failures(run):
    """Adds the failed loads of the frame the driver is in. chromedriver's performance log does
    not see a cross-site (out-of-process) frame's requests; the frame's own Navigation and
    Resource Timing entries give their statuses (a WebSocket's only shows in its probe)."""
    try:
        entries = run.driver.execute_script(
            "return performance.getEntriesByType('navigation')"
            ".concat(performance.getEntriesByType('resource'))"
            ".map(e => [e.name, e.initiatorType, e.responseStatus]);"
        )
    except WebDriverException:
        return
    for url, kind, status in entries:
        if status >= 400:
            run.log.failed.append({"url": url, "status": status, "type": f"frame {kind}"})


def iframe(run, url):
    Embedder.target = url
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Embedder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outer = f"http://127.0.0.1:{server.server_address[1]}/"
        run.step("open embedder", lambda: run.open(outer))
        frame = run.wait(EC.presence_of_element_located((By.ID, "preview")), "the iframe")
        run.step("enter frame", lambda: run.driver.switch_to.frame(frame))
        try:
            run.step("probes", lambda: read_probes(run))
            run.usable()
        finally:
            frame_failures(run)
            run.driver.switch_to.default_content()
    finally:
        server.shutdown()


SCENARIOS = {"jupyter": jupyter, "streamlit": streamlit, "gradio": gradio, "page": page, "iframe": iframe}


def attempt(scenario, url, screenshot, timeout):
    profile = tempfile.mkdtemp(prefix="previewd-chromium-")
    driver = None
    try:
        t = time.monotonic()
        driver = browser(profile)
        browser_start_s = round(time.monotonic() - t, 2)
        driver.set_page_load_timeout(timeout)
        # What the browser did before the scenario's first navigation (its new-tab page) is
        # not the scenario's.
        driver.get_log("performance")
        driver.get_log("browser")
        run = Run(driver, timeout)
        try:
            SCENARIOS[scenario](run, url)
        except StepFailed:
            pass
        page_text = None
        try:
            run.log.drain(driver)
            driver.switch_to.default_content()
            driver.save_screenshot(screenshot)
            if not all(s["ok"] for s in run.steps):
                page_text = driver.find_element(By.TAG_NAME, "body").text[:1500]
        except WebDriverException as e:
            page_text = f"(could not read the page: {str(e).splitlines()[0]})"
        return {
            "scenario": scenario,
            "url": url,
            "ok": bool(run.steps) and all(s["ok"] for s in run.steps),
            "steps": run.steps,
            "browser_start_s": browser_start_s,
            "usable_s": run.usable_s,
            "failed_requests": run.log.failed,
            "websockets": list(run.log.websockets.values()),
            "failed_websockets": run.log.websockets_failed(),
            "event_streams": run.log.event_streams,
            "console_errors": run.log.console_errors,
            "network_changed": run.log.network_changed,
            "final_url": driver.current_url,
            "page_text": page_text,
            "screenshot": screenshot,
        }
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("url")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--timeout", type=float, default=90)
    a = ap.parse_args()
    retried = []
    for n in range(1, ATTEMPTS + 1):
        report = attempt(a.scenario, a.url, a.screenshot, a.timeout)
        # An attempt that saw the network change is retried whether or not its steps passed:
        # its failed requests are the host's doing.
        if not report["network_changed"] or n == ATTEMPTS:
            break
        retried.append({"steps": report["steps"], "failed_requests": len(report["failed_requests"])})
        print(f"attempt {n} saw {NETWORK_CHANGED}: retrying", file=sys.stderr)
    report["attempts"] = n
    report["retried_after_network_changed"] = retried
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
