"""itae-search serve probed as a hostile client or a careless collection would: a body shorter than
its Content-Length, a body that never arrives, a session file that cannot be saved, and an index
whose scores are not finite. Each gets a clean HTTP answer, the session stays whole, and the
server's terminal shows no traceback.

The collection is the forged one of tests/test_integrity_server.py (no model needed)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from test_integrity_server import _mark_body, forged, own_headers, request  # noqa: F401 - forged: the fixture

from itae_export.search.index import SearchIndex
from itae_export.search.server import SearchApp, make_server
from itae_export.search.session import Session, new_session


@pytest.fixture()
def running(forged):  # noqa: F811 - the fixture imported above
    """(server, app, port, session path), the server serving in a thread."""
    index, tmp = forged
    session = new_session(index, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], index.model_id, k=4)
    app = SearchApp(index, session, tmp / "session.json")
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, app, server.server_address[1], tmp / "session.json"
    server.shutdown()
    server.server_close()


def _raw_post(port, headers, body: bytes, length: int, end: bool, timeout: float = 10) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    lines = ["POST /api/refine HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines + [f"Content-Length: {length}"]) + "\r\n\r\n").encode() + body)
    if end:
        s.shutdown(socket.SHUT_WR)
    return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes; the socket is closed after."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    return out


def _get(addr: str, port: int, path: str, host: str | None = None) -> bytes:
    """The whole answer to a plain GET of ``path`` (``Host``: the address and port unless given)."""
    s = socket.create_connection((addr, port), timeout=5)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host or f'{addr}:{port}'}\r\n\r\n".encode())
    return _read_all(s)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


def test_a_body_shorter_than_its_content_length_is_refused(running, capfd):
    """A client that declares 100 bytes, sends a complete JSON object of fewer and ends its side:
    400, not a refinement made from a body cut short."""
    _, app, port, session_path = running
    before = session_path.read_bytes()
    body = _mark_body(app)
    answer = _raw_post(port, own_headers(app, port), body, len(body) + 50, end=True)
    assert _status(answer) == 400, answer[:80]
    assert session_path.read_bytes() == before and app.session.judgments == {}
    assert "Traceback" not in capfd.readouterr().err


def test_a_body_that_never_arrives_gets_408(running, capfd):
    """A client that sends its headers and part of its body, then waits: after the handler's
    timeout it gets 408 (not a connection closed without an answer), and nothing is judged."""
    server, app, port, session_path = running
    server.RequestHandlerClass.timeout = 1.0
    before = session_path.read_bytes()
    t0 = time.monotonic()
    answer = _raw_post(port, own_headers(app, port), b'{"marks": ', 100, end=False)
    assert _status(answer) == 408, answer[:80]
    assert time.monotonic() - t0 < 8
    assert session_path.read_bytes() == before and app.session.judgments == {}
    assert "Traceback" not in capfd.readouterr().err


def test_a_session_that_cannot_be_saved_changes_nothing(running, capfd):
    """The session file's place taken by a folder (as a full disk or a read-only filesystem would): the refine gets
    500 with a JSON error the page shows, the session in memory is as before (not judged in
    memory only), and once the file can be written again the same marks go through."""
    _, app, port, session_path = running
    shown = app.state()
    body = _mark_body(app)
    session_path.unlink()
    session_path.mkdir()
    status, headers, answer = request(port, "POST", "/api/refine", body, own_headers(app, port))
    assert status == 500, (status, answer[:80])
    assert headers["Content-Type"] == "application/json" and "could not be saved" in json.loads(answer)["error"]
    assert app.session.judgments == {} and app.state() == shown
    err = capfd.readouterr().err
    assert "Traceback" not in err and "could not be saved" in err
    session_path.rmdir()
    status, _, answer = request(port, "POST", "/api/refine", body, own_headers(app, port))
    assert status == 200 and json.loads(answer)["round"] == 1
    assert len(Session.load(session_path).judgments) == 1


def _strict_json(text: bytes):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_scores_that_are_not_finite_stay_json(forged, tmp_path):  # noqa: F811
    """An index with a NaN embedding (a careless collection) ranks an image with a score of
    -inf; /api/results must still be JSON a browser parses (no NaN/Infinity tokens): null."""
    index, tmp = forged
    vectors = index.vectors.copy()
    vectors[2] = np.nan
    bad = SearchIndex(index.root, index.paths, vectors, index.model_id)
    session = new_session(bad, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], bad.model_id,
                          k=len(bad))
    app = SearchApp(bad, session, None)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        status, _, answer = request(port, "GET", "/api/results")
        assert status == 200
        results = _strict_json(answer)["results"]
        assert all(r["score"] is None or np.isfinite(r["score"]) for r in results)
        assert any(r["score"] is None for r in results)  # the case this test is about did occur
        status, _, answer = request(port, "POST", "/api/refine", _mark_body(app), own_headers(app, port))
        assert status == 200 and _strict_json(answer)["round"] == 1
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/img/%2e%2e/x", "/img/..%2f..%2fetc%2fpasswd", "/img/%252e%252e", "/img/..\\..\\x",
                                  "/img/0%00", "/img/\u0663", "/img/\uff10", "/img/0x1", "/img/1e0", "/img/" + "0" * 19 + "1",
                                  "/api/results/..", "/img/../api/results"])
def test_path_tricks_on_img_get_404(running, path):
    """Encoded and double-encoded dot segments, backslashes, NUL, non-ASCII digits (Arabic-Indic
    three, fullwidth zero), hex and exponent forms: never a file, never a traceback."""
    _, app, port, _ = running
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    assert _status(answer) in (400, 404), (path, answer[:60])
    assert b"image/" not in answer.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("host", ["localhost.:{port}", "127.0.0.1.:{port}", "0.0.0.0:{port}", "127.1:{port}",
                                  "[::ffff:127.0.0.1]:{port}", "0x7f000001:{port}", "2130706433:{port}"])
def test_host_spellings_that_are_not_a_loopback_literal_are_refused(running, host):
    """A rebinding name cannot take any of these forms, but a browser would send them as typed:
    only 127.0.0.0/8, ::1 and localhost (any case) are answered, the page and its token included."""
    _, app, port, _ = running
    host = host.replace("{port}", str(port))
    for path in ("/", "/api/results"):
        assert request(port, "GET", path, host=host)[0] == 403, (host, path)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "FOO", "get"])
def test_other_methods_change_nothing_and_echo_nothing(running, method):
    _, app, port, session_path = running
    before = session_path.read_bytes()
    status, headers, body = request(port, method, "/api/refine", b"{}", own_headers(app, port))
    assert status in (405, 501) and headers["X-Content-Type-Options"] == "nosniff"
    assert app.token.encode() not in body and session_path.read_bytes() == before


def test_the_token_page_is_not_cached_and_not_framed(running):
    """The page (which carries the token) is served even to a cross-site navigation (a link to it),
    but never stored by a cache, framed, or given a referrer."""
    _, app, port, _ = running
    status, h, page = request(port, "GET", "/", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 200 and app.token.encode() in page
    assert h["Cache-Control"] == "no-store" and h["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"] and h["Referrer-Policy"] == "no-referrer"
    assert "Access-Control-Allow-Origin" not in h


def test_a_client_dripping_bytes_is_cut_off_at_the_deadline(running, monkeypatch, capfd):
    """One header byte every 0.3 s restarts the idle timeout each time; the total deadline still
    closes the connection (before the fix it stayed open for as long as the client dripped)."""
    from itae_export.search import server as srv

    monkeypatch.setattr(srv, "REQUEST_DEADLINE", 1.5)
    _, _, port, _ = running
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    closed = False
    try:
        for b in (f"GET /api/results HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nX-Slow: " + "a" * 100).encode():
            s.sendall(bytes([b]))
            time.sleep(0.3)
            if time.monotonic() - t0 > 6:
                break
    except OSError:  # reset by the server: closed
        closed = True
    if not closed:
        s.settimeout(2)
        try:
            closed = s.recv(1024) == b""
        except OSError:
            closed = True
    s.close()
    assert closed and time.monotonic() - t0 < 6, "the dripping connection was still open after 6 s"
    assert "Traceback" not in capfd.readouterr().err


def test_more_connections_than_the_cap_get_503_and_the_server_recovers(running, monkeypatch):
    """Idle connections fill every slot: one more gets 503 at once (not a queue behind slow
    clients); once they close, requests are served again."""
    from itae_export.search import server as srv

    server, _, port, _ = running
    server._slots = threading.BoundedSemaphore(3)
    monkeypatch.setattr(srv, "MAX_CONNECTIONS", 3)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    time.sleep(0.3)  # the server has accepted them, each in its thread
    answer = _get("127.0.0.1", port, "/api/results")
    assert _status(answer) == 503, answer[:80]
    for c in idle:
        c.close()
    deadline = time.monotonic() + 5
    while True:
        answer = _get("127.0.0.1", port, "/")
        if _status(answer) == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert _status(answer) == 200


def test_serve_on_ipv6_loopback(forged):  # noqa: F811 - the fixture imported above
    """--host ::1 listens (the server was IPv4 only: 'Address family for hostname not supported'),
    answers a Host of [::1]:PORT, refuses another Host, and its URL has brackets."""
    from itae_export.search.server import server_url

    index, tmp = forged
    session = new_session(index, tmp, {"kind": "like", "value": "a.png"}, index.vectors[0], index.model_id, k=4)
    try:
        server = make_server(SearchApp(index, session, tmp / "session.json"), "::1", 0)
    except OSError as e:  # pragma: no cover - a machine without IPv6
        pytest.skip(f"no IPv6 loopback here: {e}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert server_url(server) == f"http://[::1]:{port}/"
        assert _status(_get("::1", port, "/", host=f"[::1]:{port}")) == 200
        assert _status(_get("::1", port, "/", host=f"evil.example:{port}")) == 403
    finally:
        server.shutdown()
        server.server_close()
