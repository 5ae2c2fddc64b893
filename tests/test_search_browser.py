"""itae-search serve in headless Chromium: click relevant/irrelevant marks, press Refine, and check
that the grid changes and that the judged images are gone.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), with real mouse events at the
buttons' positions; nothing beyond the standard library is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from test_report import CHROMIUM_FLAGS, chromium  # noqa: F401 - the fixture

from itae_export.search.index import load_index
from itae_export.search.server import SearchApp, make_server
from itae_export.search.session import Session, new_session


class DevTools:
    """A minimal DevTools-protocol client over Chromium's pipe."""

    def __init__(self, chromium: str, profile, url: str = "about:blank"):
        r_cmd, w_cmd = os.pipe()  # we write commands, Chromium reads them on fd 3
        r_evt, w_evt = os.pipe()  # Chromium writes on fd 4

        def child_fds():
            os.dup2(r_cmd, 3)
            os.dup2(w_evt, 4)

        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      "--window-size=1200,900", url],
                                     pass_fds=(r_cmd, w_evt, 3, 4), preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r_cmd)
        os.close(w_evt)
        self.w, self.r = os.fdopen(w_cmd, "wb", buffering=0), os.fdopen(r_evt, "rb", buffering=0)
        self.next_id, self.buf, self.session = 0, b"", None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = self.r.read(65536)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})

    def attach_page(self) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expression)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(expression)

    def click(self, selector: str) -> None:
        """A real left click (mouse pressed and released) at the centre of the element."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                      " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _shown(dt: DevTools) -> list[int]:
    return [int(i) for i in dt.js("document.body.dataset.shown").split(",") if i]


@pytest.mark.browser
def test_marks_refine_and_judged_images_are_gone(collection, chromium, tmp_path):
    index = load_index(collection)
    session = new_session(index, collection, {"kind": "like", "value": index.paths[0]}, index.vectors[0],
                          index.model_id, k=8, method="knn")
    session_path = tmp_path / "session.json"
    server = make_server(SearchApp(index, session, session_path), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    dt = DevTools(chromium, tmp_path / "profile")
    try:
        dt.attach_page()
        dt.call("Page.enable")
        dt.call("Page.navigate", url=url)
        dt.wait_for("document.body && document.body.dataset.ready === 'yes'")
        dt.wait_for("[...document.images].length === 8 && [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        before = _shown(dt)
        assert len(before) == 8 and dt.js("document.body.dataset.round") == "0"

        # mark two relevant and one irrelevant by clicking; a second click on a mark takes it back
        rel, irr, undone = before[0], before[1], before[2]
        dt.click(f'figure[data-id="{rel}"] .mark-relevant')
        dt.click(f'figure[data-id="{irr}"] .mark-irrelevant')
        dt.click(f'figure[data-id="{undone}"] .mark-relevant')
        dt.click(f'figure[data-id="{undone}"] .mark-relevant')
        assert dt.js(f'document.querySelector(\'figure[data-id="{rel}"]\').classList.contains("relevant")')
        assert dt.js(f'document.querySelector(\'figure[data-id="{irr}"]\').classList.contains("irrelevant")')
        assert not dt.js(f'document.querySelector(\'figure[data-id="{undone}"]\').className.includes("relevant")')
        dt.click("#refine")
        dt.wait_for("document.body.dataset.ready === 'yes' && document.body.dataset.round === '1'")
        after = _shown(dt)
        assert after != before and len(after) == 8
        assert rel not in after and irr not in after  # judged images are gone
        assert "judged 1 relevant, 1 irrelevant" in dt.js("document.getElementById('status').textContent")
        dt.wait_for("[...document.images].every(i => i.complete && i.naturalWidth > 0)")

        # the session on disk holds exactly the clicked marks
        saved = Session.load(session_path)
        assert saved.judgments == {index.paths[rel]: True, index.paths[irr]: False}

        # a second round: mark everything shown irrelevant; none of it comes back
        for i in after:
            dt.click(f'figure[data-id="{i}"] .mark-irrelevant')
        dt.click("#refine")
        dt.wait_for("document.body.dataset.round === '2' && document.body.dataset.ready === 'yes'")
        third = _shown(dt)
        assert third and not set(third) & (set(after) | {rel, irr})
    finally:
        dt.close()
        server.shutdown()
        server.server_close()
