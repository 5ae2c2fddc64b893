"""``itae-search serve``: a local web page over one search session.

The page shows the result grid; each image has a relevant and an irrelevant toggle, and
"Refine" sends the marks, which re-rank the collection (judged images are never shown again).
The session is saved after every refinement, so a closed page or a restarted server resumes.

Safety: the server binds to 127.0.0.1 unless told otherwise (``allow_remote``), and it serves
only the page, its JSON API and the images of the index, by row number (``/img/<row>``): no
request names a path on disk, so there is nothing to traverse. Bound locally, it answers only
requests whose Host header names a loopback address (403 otherwise), so that a web page
elsewhere cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import mimetypes
import threading
from pathlib import Path
from urllib.parse import urlsplit

from itae_export.errors import InputError
from itae_export.search.feedback import FeedbackParams
from itae_export.search.index import SearchIndex
from itae_export.search.session import Session

MAX_BODY = 1 << 20


def check_bind(host: str, allow_remote: bool = False) -> None:
    """Loopback addresses only, unless ``allow_remote``."""
    if allow_remote:
        return
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InputError(f"--host {host}: not a loopback address; the page would be reachable from other machines. "
                     "Add --allow-remote if that is what you want")


class SearchApp:
    """The state behind the page: one index, one session, saved to ``session_path`` on each change."""

    def __init__(self, index: SearchIndex, session: Session, session_path: str | Path | None,
                 params: FeedbackParams | None = None):
        self.index, self.session, self.session_path = index, session, session_path
        self.params = params
        self.lock = threading.Lock()
        self.page: list[tuple[str, float]] = []
        with self.lock:
            self._next_page()

    def _next_page(self) -> None:
        self.page = self.session.results(self.index, self.params)
        if self.session_path:
            self.session.save(self.session_path)

    def state(self) -> dict:
        s = self.session
        return {
            "query": s.query, "method": s.method, "round": len(s.rounds) - 1,
            "judged": {"relevant": sum(s.judgments.values()), "irrelevant": sum(not v for v in s.judgments.values())},
            "results": [{"id": self.index.row(p), "path": p, "score": round(sc, 5)} for p, sc in self.page],
        }

    def refine(self, marks: dict) -> dict:
        if not isinstance(marks, dict):
            raise InputError("marks must be an object {row: true|false}")
        with self.lock:
            judged = {}
            for key, value in marks.items():
                row = int(key)
                if not 0 <= row < len(self.index) or not isinstance(value, bool):
                    raise InputError(f"bad mark {key!r}: {value!r}")
                judged[self.index.paths[row]] = value
            self.session.judge(self.index, judged)
            self._next_page()
            return self.state()

    def image_file(self, row: str) -> Path | None:
        if not row.isdigit() or int(row) >= len(self.index):
            return None
        path = self.index.root / self.index.paths[int(row)]
        return path if path.is_file() else None


def _is_local_host_header(value: str | None) -> bool:
    if not value:
        return False
    host = value.rsplit(":", 1)[0] if not value.startswith("[") else value[1:].split("]", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_handler(app: SearchApp, local_only: bool = True):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "itae-search"

        def _foreign(self) -> bool:
            if local_only and not _is_local_host_header(self.headers.get("Host")):
                self._send(403, b"forbidden: not a local Host\n", "text/plain")
                return True
            return False

        def log_message(self, fmt, *args):  # quiet: the CLI prints the one address line
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, code: int = 200) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - http.server's name
            if self._foreign():
                return
            path = urlsplit(self.path).path
            if path == "/":
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if path == "/api/results":
                with app.lock:
                    return self._json(app.state())
            if path.startswith("/img/"):
                f = app.image_file(path[len("/img/"):])
                if f is not None:
                    ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                    return self._send(200, f.read_bytes(), ctype)
            self._send(404, b"not found\n", "text/plain")

        def do_POST(self):  # noqa: N802
            if self._foreign():
                return
            if urlsplit(self.path).path != "/api/refine":
                return self._send(404, b"not found\n", "text/plain")
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                return self._send(413, b"too large\n", "text/plain")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
                self._json(app.refine(body.get("marks", {})))
            except (InputError, ValueError, AttributeError) as e:
                self._json({"error": str(e)}, 400)

    return Handler


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False):
    """A ThreadingHTTPServer for ``app`` (port 0: any free port; read ``server.server_address``)."""
    check_bind(host, allow_remote)
    try:
        return http.server.ThreadingHTTPServer((host, port), make_handler(app, local_only=not allow_remote))
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>itae-search</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem;background:#fafafa}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.card{background:#fff;border:3px solid #ddd;border-radius:6px;padding:.3rem;margin:0}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.card figcaption{font-size:.7rem;overflow-wrap:anywhere;margin:.2rem 0}
.card.relevant{border-color:#2a9d3a}.card.irrelevant{border-color:#c62828;opacity:.6}
.card button{font-size:.75rem;margin-right:.2rem}
header{display:flex;gap:1rem;align-items:center;margin-bottom:.8rem}
#refine{font-size:1rem;padding:.3rem 1rem}
</style></head>
<body data-round="-1" data-shown="" data-ready="no">
<header><b>itae-search</b><span id="query"></span><button id="refine">Refine</button>
<span id="status"></span></header>
<main id="grid"></main>
<script>
"use strict";
let marks = {};
function render(state) {
  const grid = document.getElementById("grid");
  grid.textContent = "";
  marks = {};
  for (const r of state.results) {
    const fig = document.createElement("figure");
    fig.className = "card"; fig.dataset.id = r.id;
    const img = document.createElement("img");
    img.src = "/img/" + r.id; img.alt = r.path;
    const cap = document.createElement("figcaption");
    cap.textContent = r.path + " (" + r.score.toFixed(3) + ")";
    const yes = document.createElement("button");
    yes.className = "mark-relevant"; yes.textContent = "relevant";
    const no = document.createElement("button");
    no.className = "mark-irrelevant"; no.textContent = "irrelevant";
    yes.onclick = () => toggle(fig, true);
    no.onclick = () => toggle(fig, false);
    fig.append(img, cap, yes, no);
    grid.append(fig);
  }
  document.getElementById("query").textContent = state.query.kind + ": " + state.query.value + " | " + state.method;
  document.getElementById("status").textContent = "round " + state.round + ", judged " +
    state.judged.relevant + " relevant, " + state.judged.irrelevant + " irrelevant";
  document.body.dataset.round = state.round;
  document.body.dataset.shown = state.results.map(r => r.id).join(",");
  document.body.dataset.ready = "yes";
}
function toggle(fig, relevant) {
  const id = fig.dataset.id;
  if (marks[id] === relevant) { delete marks[id]; } else { marks[id] = relevant; }
  fig.classList.toggle("relevant", marks[id] === true);
  fig.classList.toggle("irrelevant", marks[id] === false);
  document.body.dataset.marked = Object.keys(marks).length;
}
async function refine() {
  document.body.dataset.ready = "no";
  const r = await fetch("/api/refine", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({marks: marks})});
  render(await r.json());
}
document.getElementById("refine").onclick = refine;
fetch("/api/results").then(r => r.json()).then(render);
</script></body></html>
"""
