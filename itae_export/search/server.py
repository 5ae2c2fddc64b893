"""``itae-search serve``: a local web page over one search session.

The page shows the result grid; each image has a relevant and an irrelevant toggle, and
"Refine" sends the marks, which re-rank the collection (judged images are never shown again).
The session is saved after every refinement, so a closed page or a restarted server resumes.

Safety (a page that only its user drives; docs/reliability.md, "The search server"):

- It binds to a loopback address unless told otherwise (``allow_remote``), and answers only
  requests whose ``Host`` header names the bound port and, bound locally, a loopback address
  (403 otherwise): a web page elsewhere cannot reach it through DNS rebinding.
- A state-changing request (``POST /api/refine``) must come from the page itself: an ``Origin``
  equal to the server's own (a POST without one is refused), ``Sec-Fetch-Site`` absent or
  ``same-origin``, ``Content-Type: application/json`` (a no-cors ``text/plain`` POST gets 415),
  and the per-session random token the page carries (``X-Itae-Token``). Nothing is read or saved
  before all of these hold.
- The body is bounded (:data:`MAX_BODY`); a ``Content-Length`` that is missing, negative or not a
  number is refused (411/400) without reading; a body shorter than its ``Content-Length`` gets
  400, one that does not arrive within :data:`REQUEST_TIMEOUT` 408; a malformed request gets 400,
  never a traceback.
- A refinement is all or nothing: a session that cannot be saved gets 500 and the session in
  memory is restored. Every JSON answer is strict JSON (a score that is not finite is null).
- Images are served by row number (``/img/<row>``) and only when the row's path, after resolving
  links, lies inside the collection's image folder and the file's first bytes are those of an
  image (PNG, JPEG, GIF, WebP, BMP, TIFF); the content type comes from those bytes. An
  ``assignments.csv`` that lists ``../../etc/passwd``, an absolute path, a link out of the folder
  or ``x.html`` gets 404.
- Every response carries ``X-Content-Type-Options: nosniff``, a Content-Security-Policy
  (the page's own script and style by hash, nothing else; other responses ``default-src 'none'``
  and sandboxed), ``Cross-Origin-Resource-Policy: same-origin`` and ``X-Frame-Options: DENY``.
- The listen backlog holds a burst of connections (:data:`LISTEN_BACKLOG`); an idle connection is
  closed after :data:`REQUEST_TIMEOUT` seconds, and any connection after :data:`REQUEST_DEADLINE`
  seconds in all (a client that drips one byte at a time restarts the idle timer, not the
  deadline). At most :data:`MAX_CONNECTIONS` requests are served at once; one more gets 503 at
  once, so slow clients cannot hold every thread.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import html
import http.server
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from itae_export.errors import InputError, OutputError
from itae_export.search.feedback import FeedbackParams
from itae_export.search.index import SearchIndex
from itae_export.search.session import Session

MAX_BODY = 1 << 20
LISTEN_BACKLOG = 128
REQUEST_TIMEOUT = 30.0
REQUEST_DEADLINE = 60.0  # seconds for a whole request, headers, body and answer
MAX_CONNECTIONS = 64  # requests served at once
TOKEN_HEADER = "X-Itae-Token"
_DIGITS = re.compile(r"[0-9]{1,18}")
# (magic bytes at offset 0, content type); WebP is RIFF....WEBP
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def image_content_type(head: bytes) -> str | None:
    """The image content type that the first bytes of a file announce, or None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, ctype in _IMAGE_MAGIC:
        if head.startswith(magic):
            return ctype
    return None


def check_bind(host: str, allow_remote: bool = False) -> None:
    """Loopback addresses only, unless ``allow_remote``."""
    if allow_remote or _is_loopback_name(host):
        return
    raise InputError(f"--host {host}: not a loopback address; the page would be reachable from other machines. "
                     "Add --allow-remote if that is what you want")


class SearchApp:
    """The state behind the page: one index, one session, saved to ``session_path`` on each change.

    ``token``: a random secret made per app (per ``serve`` run), written into the page and
    required on every state-changing request."""

    def __init__(self, index: SearchIndex, session: Session, session_path: str | Path | None,
                 params: FeedbackParams | None = None):
        self.index, self.session, self.session_path = index, session, session_path
        self.params = params
        self.token = secrets.token_urlsafe(32)
        self.lock = threading.Lock()
        self.page: list[tuple[str, float]] = []
        self._root = Path(index.root).resolve()
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
            # a score that is not finite (NaN embeddings in a careless collection) is null: the
            # response stays JSON that a browser parses
            "results": [{"id": self.index.row(p), "path": p, "score": round(sc, 5) if math.isfinite(sc) else None}
                        for p, sc in self.page],
        }

    def refine(self, marks: dict) -> dict:
        if not isinstance(marks, dict):
            raise InputError("marks must be an object {row: true|false}")
        with self.lock:
            judged = {}
            for key, value in marks.items():
                if not isinstance(key, str) or not _DIGITS.fullmatch(key) or not isinstance(value, bool) \
                        or int(key) >= len(self.index):
                    raise InputError(f"bad mark {key!r}: {value!r}")
                judged[self.index.paths[int(key)]] = value
            # all or nothing: when the judgments cannot be recorded or saved (a full disk, a
            # read-only filesystem), the session and the page stay as they were
            before = copy.deepcopy((self.session.judgments, self.session.rounds)), self.page
            try:
                self.session.judge(self.index, judged)
                self._next_page()
            except BaseException:
                (self.session.judgments, self.session.rounds), self.page = before
                raise
            return self.state()

    def check_token(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self.token.encode())

    def image_file(self, row: str) -> Path | None:
        """The file of row ``row`` if it is a regular file inside the image folder after resolving
        links (None otherwise); whether it is an image is checked on its bytes when served."""
        if not _DIGITS.fullmatch(row) or int(row) >= len(self.index):
            return None
        rel = self.index.paths[int(row)]
        if not rel or "\0" in rel or os.path.isabs(rel):
            return None
        try:
            path = (self._root / rel).resolve(strict=True)
        except (OSError, ValueError, RuntimeError):  # missing, a loop, a bad name
            return None
        if path == self._root or not path.is_relative_to(self._root) or not path.is_file():
            return None
        return path


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port or None) of a Host or Origin authority; None when malformed."""
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        host, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", None)
        if value.count(":") > 1:
            return None
        if not sep:
            host, port = value, None
    if port is not None and not _DIGITS.fullmatch(port):
        return None
    return host.lower(), (int(port) if port is not None else None)


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """Whether ``--host`` names this machine only (localhost or a loopback address)."""
    return _is_loopback_name(host)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def make_handler(app: SearchApp, local_only: bool = True, port: int | None = None, names: frozenset = frozenset()):
    """The request handler class for ``app``.

    ``port``: the bound port, which the Host header must name (None: any, for tests of the
    handler alone); ``names``: host names accepted besides IP literals when ``local_only`` is off."""
    page_csp = ("default-src 'none'; img-src 'self'; connect-src 'self'; "
                f"script-src {_hash_source(PAGE_SCRIPT)}; style-src {_hash_source(PAGE_STYLE)}; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    other_csp = "default-src 'none'; frame-ancestors 'none'; sandbox"

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "itae-search"
        sys_version = ""
        protocol_version = "HTTP/1.0"
        default_request_version = "HTTP/1.0"  # an HTTP/0.9 request line gets a status line and headers too
        error_content_type = "text/plain; charset=utf-8"
        error_message_format = "%(code)d %(message)s\n"
        timeout = REQUEST_TIMEOUT
        _csp = other_csp

        def setup(self):
            super().setup()
            # a total deadline: the idle timeout restarts with every byte a slow client sends
            self._deadline = threading.Timer(REQUEST_DEADLINE, self._expire)
            self._deadline.daemon = True
            self._deadline.start()

        def _expire(self):
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # the handler's read or write then fails
            except OSError:
                pass

        def finish(self):
            self._deadline.cancel()
            try:
                super().finish()
            except OSError:  # the deadline shut the socket: nothing left to flush
                pass

        def parse_request(self) -> bool:
            if len(self.raw_requestline.split()) != 3:  # no HTTP/0.9 ("GET /"): 400
                self.command, self.request_version = None, self.default_request_version
                self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
                self.close_connection = True
                self.send_error(400, "Bad request line")
                return False
            return super().parse_request()

        def log_message(self, fmt, *args):  # quiet: the CLI prints the one address line
            pass

        def end_headers(self):
            # on every response, error pages of http.server included
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", self._csp)
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _refuse(self, code: int, why: str) -> None:
            self.close_connection = True
            self._send(code, (why + "\n").encode(), "text/plain; charset=utf-8")

        def _json(self, obj, code: int = 200) -> None:
            self._send(code, json.dumps(obj, allow_nan=False).encode(), "application/json")

        def _host(self) -> tuple[str, int] | None:
            """(host, port) of a Host header this server answers, or None."""
            values = self.headers.get_all("Host") or []
            if len(values) != 1:
                return None
            parsed = _split_host(values[0].strip())
            if parsed is None:
                return None
            host, p = parsed
            p = 80 if p is None else p
            if port is not None and p != port:
                return None
            if local_only:
                ok = _is_loopback_name(host)
            else:
                ok = _is_ip_literal(host) or host in names
            return (host, p) if ok else None

        def _same_origin(self, host: tuple[str, int]) -> bool:
            site = self.headers.get("Sec-Fetch-Site")
            if site is not None and site.strip().lower() != "same-origin":
                return False
            origins = self.headers.get_all("Origin") or []
            if len(origins) != 1:
                return False
            try:
                o = urlsplit(origins[0].strip())
                oport = o.port or 80
            except ValueError:
                return False
            if o.scheme != "http" or o.path or o.query or o.username or o.password or o.hostname is None:
                return False
            return (o.hostname.lower(), oport) == host

        def _guard(self) -> tuple[str, int] | None:
            host = self._host()
            if host is None:
                self._refuse(403, "forbidden: not a Host this server answers")
            return host

        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.do_GET()

        def do_GET(self):  # noqa: N802
            if self._guard() is None:
                return
            path = urlsplit(self.path).path
            if path == "/":
                self._csp = page_csp
                return self._send(200, page_html(app.token).encode(), "text/html; charset=utf-8")
            site = (self.headers.get("Sec-Fetch-Site") or "same-origin").strip().lower()
            if site not in ("same-origin", "none"):
                return self._refuse(403, "forbidden: a cross-site request")
            if path == "/api/results":
                with app.lock:  # not held while a slow client reads the answer
                    state = app.state()
                return self._json(state)
            if path.startswith("/img/"):
                f = app.image_file(path[len("/img/"):])
                if f is not None and self._send_image(f):
                    return
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send_image(self, path: Path) -> bool:
            try:  # the resolved path, opened without following a link swapped in since, nor blocking on a FIFO
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                return False
            try:
                with os.fdopen(fd, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        return False
                    head = fh.read(16)
                    ctype = image_content_type(head)
                    if ctype is None:
                        return False
                    size = st.st_size
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    self.close_connection = True
                    if self.command != "HEAD":
                        try:  # a client gone mid-image, or a file cut short: the connection just ends
                            self.wfile.write(head)
                            shutil.copyfileobj(fh, self.wfile)
                        except OSError:
                            pass
                    return True
            except OSError:
                return False

        def _body_length(self) -> int | None:
            """The request's Content-Length when it is one non-negative number <= MAX_BODY; else
            the refusal is sent and None returned."""
            if self.headers.get("Transfer-Encoding") is not None:
                self._refuse(411, "a Content-Length is required (no Transfer-Encoding)")
                return None
            values = self.headers.get_all("Content-Length") or []
            if not values:
                self._refuse(411, "a Content-Length is required")
                return None
            if len(values) != 1 or not _DIGITS.fullmatch(values[0].strip()):
                self._refuse(400, "bad Content-Length")
                return None
            n = int(values[0].strip())
            if n > MAX_BODY:
                self._refuse(413, "too large")
                return None
            return n

        def do_POST(self):  # noqa: N802
            host = self._guard()
            if host is None:
                return
            if urlsplit(self.path).path != "/api/refine":
                return self._refuse(404, "not found")
            n = self._body_length()
            if n is None:
                return
            if not self._same_origin(host):
                return self._refuse(403, "forbidden: not a request of the page itself (Origin / Sec-Fetch-Site)")
            ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return self._refuse(415, "the body must be application/json")
            if not app.check_token(self.headers.get(TOKEN_HEADER)):
                return self._refuse(403, "forbidden: missing or wrong session token")
            try:
                data = self.rfile.read(n)
            except (TimeoutError, socket.timeout):
                return self._refuse(408, f"the body did not arrive within {self.timeout:g} s")
            if len(data) != n:  # the client ended its side before the whole body
                return self._refuse(400, f"the body has {len(data)} bytes, its Content-Length says {n}")
            try:
                body = json.loads(data or b"{}")
                if not isinstance(body, dict):
                    raise InputError("the body must be a JSON object {\"marks\": {...}}")
                state = app.refine(body.get("marks", {}))
            except (InputError, ValueError, RecursionError) as e:
                self.close_connection = True
                return self._json({"error": str(e)}, 400)
            except (OutputError, OSError) as e:  # nothing was judged (SearchApp.refine)
                self.close_connection = True
                print(f"itae-search: the session could not be saved: {e}", file=sys.stderr)
                return self._json({"error": f"the session could not be saved, nothing was judged: {e}"}, 500)
            self._json(state)

        def _not_allowed(self):
            if self._guard() is not None:
                self._refuse(405, "method not allowed")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    return Handler


class SearchServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server with a listen backlog for a burst of connections and no traceback
    in the terminal for a request that fails (a malformed one gets 400 from the handler; a
    dropped connection is nobody's error)."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, *a, **kw):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*a, **kw)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # every thread busy: 503 now, not a queue of slow clients
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\n\r\n503 too many connections\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        print(f"itae-search: a request from {client_address[0]} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False):
    """A :class:`SearchServer` for ``app`` (port 0: any free port; read ``server.server_address``)."""
    check_bind(host, allow_remote)
    cls = SearchServer
    if ":" in host:  # an IPv6 literal (::1, or a remote one with --allow-remote)
        cls = type("SearchServer6", (SearchServer,), {"address_family": socket.AF_INET6})
    try:
        server = cls((host, port), http.server.BaseHTTPRequestHandler)
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    names = frozenset(n.lower() for n in (host, "localhost", socket.gethostname(), socket.getfqdn()) if n)
    server.RequestHandlerClass = make_handler(app, local_only=not allow_remote, port=server.server_address[1],
                                              names=names)
    return server


def server_url(server) -> str:
    """The page's address, with brackets around an IPv6 host."""
    h, p = server.server_address[:2]
    return f"http://[{h}]:{p}/" if ":" in h else f"http://{h}:{p}/"


def page_html(token: str) -> str:
    """The page, with this session's token in a meta element (the script reads it from there, so
    the script's hash in the Content-Security-Policy stays the same)."""
    return PAGE_TEMPLATE.replace("@TOKEN@", html.escape(token, quote=True))


PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#fafafa}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.card{background:#fff;border:3px solid #ddd;border-radius:6px;padding:.3rem;margin:0}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.card figcaption{font-size:.7rem;overflow-wrap:anywhere;margin:.2rem 0}
.card.relevant{border-color:#2a9d3a}.card.irrelevant{border-color:#c62828;opacity:.6}
.card button{font-size:.75rem;margin-right:.2rem}
header{display:flex;gap:1rem;align-items:center;margin-bottom:.8rem}
#refine{font-size:1rem;padding:.3rem 1rem}
"""

PAGE_SCRIPT = """
"use strict";
const TOKEN = document.querySelector('meta[name="itae-token"]').content;
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
    cap.textContent = r.path + " (" + (r.score === null ? "no score" : r.score.toFixed(3)) + ")";
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
  const r = await fetch("/api/refine", {method: "POST", body: JSON.stringify({marks: marks}),
                                         headers: {"Content-Type": "application/json", "X-Itae-Token": TOKEN}});
  const state = await r.json();
  if (!r.ok) { document.getElementById("status").textContent = state.error || r.statusText; return; }
  render(state);
}
document.getElementById("refine").onclick = refine;
fetch("/api/results").then(r => r.json()).then(render);
"""

PAGE_TEMPLATE = ("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>itae-search</title>
<meta name="itae-token" content="@TOKEN@">
<style>""" + PAGE_STYLE + """</style></head>
<body data-round="-1" data-shown="" data-ready="no">
<header><b>itae-search</b><span id="query"></span><button id="refine">Refine</button>
<span id="status"></span></header>
<main id="grid"></main>
<script>""" + PAGE_SCRIPT
                 + """</script></body></html>
""")
