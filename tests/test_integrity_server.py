"""itae-search serve as a page that only its user drives (issue 22): cross-origin and no-cors
POSTs, the session token, DNS rebinding, a forged collection whose assignments.csv points out of
the image folder, Content-Length games, malformed requests and a 20-connection burst.

The collection here is built directly (an index over a handful of PNGs), so no model is needed."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_report import chromium  # noqa: F401 - the fixture

from itae_export.search.index import SearchIndex
from itae_export.search.server import (LISTEN_BACKLOG, MAX_BODY, SearchApp, image_content_type, make_server,
                                       page_html)
from itae_export.search.session import Session, new_session

SECRET = b"<html><script>alert('secret')</script></html>\n"


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture()
def forged(tmp_path):
    """A collection whose rows include paths that must never be served."""
    root = tmp_path / "images"
    outside = tmp_path / "outside"
    _png(root / "a.png", 10)
    _png(root / "sub" / "b.png", 20)
    _png(outside / "private.png", 30)
    (outside / "secret.txt").write_bytes(SECRET)
    (root / "x.html").write_bytes(SECRET)
    (root / "fake.png").write_bytes(SECRET)  # an image name, HTML bytes
    (root / "link_out.png").symlink_to(outside / "private.png")
    (root / "dir_link").symlink_to(outside, target_is_directory=True)
    (root / "link_in.png").symlink_to(root / "a.png")  # a link that stays inside is fine
    paths = ["a.png", "sub/b.png", "../outside/secret.txt", str(outside / "secret.txt"), "x.html", "fake.png",
             "link_out.png", "dir_link/private.png", "link_in.png", "sub/../../outside/private.png", "missing.png",
             "sub", ""]
    rng = np.random.default_rng(0)
    v = rng.standard_normal((len(paths), 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index = SearchIndex(root, paths, v, "sha256:" + "b" * 64)
    return index, tmp_path


@pytest.fixture()
def served(forged):
    index, tmp = forged
    session = new_session(index, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], index.model_id, k=4)
    app = SearchApp(index, session, tmp / "session.json")
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    yield app, port, tmp / "session.json"
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, headers=None, host=None):
    """(status, headers, body) of one request sent as given (http.client adds no Origin)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    c.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    for k, v in (headers or {}).items():
        for one in (v if isinstance(v, list) else [v]):
            c.putheader(k, one)
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    if body is not None:
        c.send(body)
    r = c.getresponse()
    out = r.status, r.headers, r.read()
    c.close()
    return out


def own_headers(app, port):
    return {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json", "X-Itae-Token": app.token,
            "Sec-Fetch-Site": "same-origin"}


def _mark_body(app):
    row = app.state()["results"][0]["id"]
    return json.dumps({"marks": {str(row): True}}).encode()


def test_the_page_itself_can_refine(served):
    app, port, session_path = served
    status, _, body = request(port, "POST", "/api/refine", _mark_body(app), own_headers(app, port))
    assert status == 200 and json.loads(body)["round"] == 1
    assert len(Session.load(session_path).judgments) == 1
    # the token is in the page, and differs between two servers
    status, headers, page = request(port, "GET", "/")
    assert status == 200 and f'content="{app.token}"'.encode() in page
    assert len(app.token) >= 32 and app.token != SearchApp(app.index, app.session, None).token


@pytest.mark.parametrize("change", [
    {"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": None},
    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    {"Origin": None},  # a POST without Origin
    {"Origin": None, "Sec-Fetch-Site": None},
    {"Origin": "http://localhost:1"},  # another port of the same machine is another origin
    {"Origin": "https://127.0.0.1:{port}"},
    {"Origin": "http://127.0.0.1:{port}/x"},
    {"Origin": ["http://127.0.0.1:{port}", "http://evil.example"]},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Content-Type": "text/plain;charset=UTF-8"},  # what fetch(..., {mode: "no-cors"}) sends
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {"Content-Type": None},
    {"X-Itae-Token": None},
    {"X-Itae-Token": "wrong"},
    {"X-Itae-Token": ""},
])
def test_a_request_not_from_the_page_changes_nothing(served, change):
    app, port, session_path = served
    before = session_path.read_bytes()
    headers = own_headers(app, port)
    for k, v in change.items():
        if v is None:
            headers.pop(k)
        else:
            headers[k] = [x.replace("{port}", str(port)) for x in v] if isinstance(v, list) else v.replace("{port}", str(port))
    status, resp_headers, _ = request(port, "POST", "/api/refine", _mark_body(app), headers)
    assert status in (403, 415), (change, status)
    assert session_path.read_bytes() == before
    assert app.session.judgments == {}
    assert resp_headers["X-Content-Type-Options"] == "nosniff" and resp_headers["Content-Security-Policy"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost:1",
                                  "127.0.0.1:{port}@evil.example", "", "127.0.0.1:{port} x", "[::1", "10.0.0.1:{port}"])
def test_host_must_name_this_server(served, host):
    """DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1."""
    app, port, session_path = served
    host = host.replace("{port}", str(port))
    before = session_path.read_bytes()
    for path in ("/", "/api/results", "/img/0"):
        assert request(port, "GET", path, host=host)[0] == 403, (host, path)
    headers = own_headers(app, port) | {"Origin": f"http://{host}"}
    assert request(port, "POST", "/api/refine", _mark_body(app), headers, host=host)[0] == 403
    assert session_path.read_bytes() == before
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert request(port, "GET", "/img/0", host=good)[0] == 200


def test_only_image_files_inside_the_root_are_served(served):
    app, port, _ = served
    paths = app.index.paths
    want = {"a.png", "sub/b.png", "link_in.png"}
    for row, p in enumerate(paths):
        status, headers, body = request(port, "GET", f"/img/{row}")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        if p in want:
            assert status == 200 and headers["Content-Type"] == "image/png", p
            assert body.startswith(b"\x89PNG")
        else:
            assert status == 404, (p, status)
            assert SECRET not in body and not body.startswith(b"\x89PNG")
            assert headers["Content-Type"].startswith("text/plain")
    for path in ("/img/-1", "/img/+1", "/img/1.0", "/img/%201", "/img/%31", "/img/" + "9" * 40, "/img/0/", "/img/"):
        assert request(port, "GET", path)[0] == 404, path


def test_cross_site_reads_are_refused(served):
    app, port, _ = served
    for path in ("/api/results", "/img/0"):
        assert request(port, "GET", path, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert request(port, "GET", path, headers={"Sec-Fetch-Site": "same-origin"})[0] == 200
    status, headers, _ = request(port, "GET", "/img/0")
    assert headers["Cross-Origin-Resource-Policy"] == "same-origin"


def test_every_response_has_the_security_headers(served):
    app, port, _ = served
    cases = [("GET", "/", None, {}), ("GET", "/api/results", None, {}), ("GET", "/nope", None, {}),
             ("GET", "/img/4", None, {}), ("POST", "/api/refine", b"{}", {"Origin": "http://evil.example"}),
             ("PUT", "/api/refine", b"{}", {}), ("OPTIONS", "/api/refine", None, {})]
    for method, path, body, headers in cases:
        status, h, _ = request(port, method, path, body, headers)
        assert h["X-Content-Type-Options"] == "nosniff", (method, path)
        assert h["Content-Security-Policy"] and "frame-ancestors 'none'" in h["Content-Security-Policy"]
    # the page's policy allows only its own script and style (by hash), no inline handlers, no other origin
    _, h, page = request(port, "GET", "/")
    csp = h["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'sha256-" in csp and "default-src 'none'" in csp
    # a malformed request line answered by http.server itself carries them too
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GARBAGE\r\n\r\n")
    answer = s.recv(65536)
    s.close()
    assert answer.startswith(b"HTTP/1.0 400") and b"nosniff" in answer and b"Content-Security-Policy" in answer


@pytest.mark.parametrize("length,code", [("-1", 400), ("-0", 400), ("abc", 400), ("1e3", 400), ("0x10", 400),
                                         (" ", 400), (str(MAX_BODY + 1), 413), ("9" * 30, 400), (None, 411),
                                         (["10", "10"], 400)])
def test_bad_content_length_is_refused_unread(served, length, code):
    app, port, session_path = served
    before = session_path.read_bytes()
    headers = own_headers(app, port)
    if length is not None:
        headers["Content-Length"] = length
    else:
        headers["Transfer-Encoding"] = "chunked"
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST /api/refine HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for k, v in headers.items():
        lines += [f"{k}: {x}" for x in (v if isinstance(v, list) else [v])]
    if length is None:
        lines = [x for x in lines if not x.startswith("Content-Length")]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x" * 64)
    answer = s.recv(65536)
    s.close()
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(code).encode(), (length, answer[:80])
    assert session_path.read_bytes() == before


def test_malformed_requests_get_400_and_no_traceback(served, capfd):
    app, port, session_path = served
    own = own_headers(app, port)
    bodies = [b"not json", b"\xff\xfe", b"[1, 2]", b'"marks"', b'{"marks": [1]}', b'{"marks": {"0": "yes"}}',
              b'{"marks": {"x": true}}', b'{"marks": {"-1": true}}', b'{"marks": {"99999": true}}',
              b'{"marks": {"1e3": true}}', b'{"marks": {" 1": true}}', b'{"marks": {"0": 1}}',
              b"[" * 100000 + b"]" * 100000, b'{"marks": 5}', b"NaN"]
    for body in bodies:
        status, h, answer = request(port, "POST", "/api/refine", body, own)
        assert status == 400, (body[:30], status)
        assert "error" in json.loads(answer)
    for raw in (b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header line\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
                b"GET / HTTP/9.9\r\n\r\n", b"GET " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)  # the request ends here (a TLS hello has no line end)
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b""
        s.close()
        assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"403", b"414", b"431", b"505"), (raw[:30], answer[:60])
        assert answer == b"" or b"text/html" not in answer.split(b"\r\n\r\n")[0]
    # a client that hangs up before reading its answer
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.sendall(b"GET /img/0 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
    s.close()
    time.sleep(0.3)
    assert app.session.judgments == {}
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_a_burst_of_20_connections_is_held(forged):
    """20 clients connect at once while the server is busy (not accepting yet): the listen backlog
    holds them all, and every one gets its answer (with a backlog of 5, most of the burst waits for
    SYN retries or is reset)."""
    index, tmp = forged
    session = new_session(index, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], index.model_id, k=4)
    server = make_server(SearchApp(index, session, None), "127.0.0.1", 0)
    port = server.server_address[1]
    assert LISTEN_BACKLOG >= 20
    socks, serving = [], threading.Thread(target=server.serve_forever, daemon=True)
    try:
        for _ in range(20):
            s = socket.socket()
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))  # a dropped SYN waits 1 s for its retry: a timeout here
            socks.append(s)
        serving.start()
        for s in socks:
            s.settimeout(10)
            s.sendall(b"GET /img/0 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
        for s in socks:
            assert s.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        for s in socks:
            s.close()
        if serving.is_alive():
            server.shutdown()
        server.server_close()


def test_image_content_type_is_from_the_bytes():
    assert image_content_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert image_content_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert image_content_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    for bad in (b"<svg xmlns=", b"<html>", b"", b"RIFF\0\0\0\0WAVE", b"%PDF-1.4"):
        assert image_content_type(bad) is None
    assert "@TOKEN@" not in page_html("t") and 'content="&lt;x&gt;"' in page_html("<x>")


def test_allow_remote_still_checks_the_host(forged):
    """Bound to all addresses, the Host must be an IP literal (or this machine's name) and the
    bound port: a rebinding name is refused."""
    index, tmp = forged
    session = new_session(index, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], index.model_id, k=4)
    server = make_server(SearchApp(index, session, None), "0.0.0.0", 0, allow_remote=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert request(port, "GET", "/img/0", host=f"evil.example:{port}")[0] == 403
        assert request(port, "GET", "/img/0", host=f"127.0.0.1:{port + 1 if port < 65535 else 1}")[0] == 403
        assert request(port, "GET", "/img/0", host=f"127.0.0.1:{port}")[0] == 200
        assert request(port, "GET", "/img/0", host=f"192.168.1.5:{port}")[0] == 200  # the address a LAN user types
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
def test_a_foreign_page_in_chromium_cannot_drive_the_server(served, chromium, tmp_path):
    """A page of another origin (another port of this machine) sends what a hostile page can: a
    no-cors text/plain POST, a form-like POST, and a JSON POST with a guessed token (which needs a
    preflight). None changes the session; the server's images do not load there either."""
    from test_search_browser import DevTools

    app, port, session_path = served
    before = session_path.read_bytes()

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"<!doctype html><title>elsewhere</title><body>hi</body>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{port}"
    row = app.state()["results"][0]["id"]
    dt = DevTools(chromium, tmp_path / "profile")
    try:
        dt.attach_page()
        dt.call("Page.enable")
        dt.call("Page.navigate", url=f"http://localhost:{evil.server_address[1]}/")
        dt.wait_for("document.title === 'elsewhere'")
        body = json.dumps({"marks": {str(row): True}})
        outcome = dt.js(f"""(async () => {{
          const out = [];
          const tries = [
            {{method: "POST", mode: "no-cors", body: {json.dumps(body)}}},
            {{method: "POST", mode: "no-cors", body: {json.dumps(body)},
              headers: {{"Content-Type": "application/x-www-form-urlencoded"}}}},
            {{method: "POST", body: {json.dumps(body)},
              headers: {{"Content-Type": "application/json", "X-Itae-Token": "guess"}}}},
          ];
          for (const t of tries) {{
            try {{ const r = await fetch("{target}/api/refine", t); out.push(r.type + ":" + r.status); }}
            catch (e) {{ out.push("blocked"); }}
          }}
          const img = new Image();
          const loaded = await new Promise(res => {{ img.onload = () => res(true); img.onerror = () => res(false);
                                                      img.src = "{target}/img/0"; }});
          out.push("img:" + loaded);
          return out.join(",");
        }})()""")
    finally:
        dt.close()
        evil.shutdown()
        evil.server_close()
    assert "img:false" in outcome, outcome
    assert session_path.read_bytes() == before, outcome
    assert app.session.judgments == {}
