"""Screenshots of a single-page app (the Prefect UI) in headless Chromium over the DevTools protocol.

Usage: ui_screenshot.py OUT.png URL WAIT_TEXT [CLICK_TEXT [WAIT_AFTER_CLICK]] [--height=PIXELS]

Opens URL in a 1440-pixel-wide window, waits until the page shows WAIT_TEXT (the app has fetched and
rendered its data), optionally clicks the element whose own text is CLICK_TEXT (a tab) and waits for
WAIT_AFTER_CLICK, then saves a PNG. A flag such as ``--virtual-time-budget`` cannot tell when an app
has rendered what it fetched; this waits for the text itself (up to 90 s). Used by scripts/screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time

from websockets.sync.client import connect

WIDTH = 1440
TIMEOUT = 90.0


class Page:
    """One Chromium tab driven over the DevTools protocol (flattened sessions)."""

    def __init__(self, ws, session: str):
        self.ws, self.session, self.ids = ws, session, itertools.count(1000)

    def call(self, method: str, **params):
        """Send ``method`` to the tab and return its result (events in between are skipped)."""
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params, "sessionId": self.session}))
        while True:
            message = json.loads(self.ws.recv(timeout=TIMEOUT))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_text(self, text: str) -> None:
        """Wait until the page's visible text contains ``text`` and nothing is loading any more."""
        deadline = time.monotonic() + TIMEOUT
        probe = f"document.body && document.body.innerText.includes({json.dumps(text)})"
        while not self.evaluate(probe):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {text!r}")
            time.sleep(0.25)
        time.sleep(1.5)  # let the last fetches render (charts, artifact bodies)

    def click_text(self, text: str) -> None:
        """Click the innermost element whose text is exactly ``text``."""
        clicked = self.evaluate(f"""(() => {{
            const all = [...document.querySelectorAll('button, a, [role=tab], li, span, div')];
            const hit = all.filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)}).pop();
            if (hit) hit.click();
            return !!hit;
        }})()""")
        if not clicked:
            raise RuntimeError(f"nothing to click with the text {text!r}")


def main(argv: list[str]) -> None:
    height = 900
    args = []
    for arg in argv:
        if arg.startswith("--height="):
            height = int(arg.split("=", 1)[1])
        else:
            args.append(arg)
    out, url, wait, *click = args
    profile = tempfile.mkdtemp(prefix="ui-screenshot-")
    browser = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = None
        for line in browser.stderr:
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                endpoint = found.group(1)
                break
        if endpoint is None:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        with connect(endpoint, max_size=None) as ws:
            ws.send(json.dumps({"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}))
            target = next(m for m in map(json.loads, iter(lambda: ws.recv(timeout=TIMEOUT), None)) if m.get("id") == 1)
            ws.send(json.dumps({"id": 2, "method": "Target.attachToTarget",
                                "params": {"targetId": target["result"]["targetId"], "flatten": True}}))
            attached = next(m for m in map(json.loads, iter(lambda: ws.recv(timeout=TIMEOUT), None)) if m.get("id") == 2)
            page = Page(ws, attached["result"]["sessionId"])
            page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
            page.call("Page.enable")
            page.call("Page.navigate", url=url)
            page.wait_text(wait)
            if click:
                page.click_text(click[0])
                page.wait_text(click[1] if len(click) > 1 else click[0])
            shot = page.call("Page.captureScreenshot", format="png")
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"saved {out}")
    finally:
        browser.terminate()
        browser.wait(10)


if __name__ == "__main__":
    main(sys.argv[1:])
