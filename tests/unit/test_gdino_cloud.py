"""Cloud Grounding DINO against a real HTTP server on 127.0.0.1 that speaks the documented v2 protocol
(create task, poll status, envelope codes) and plays the error cases. The token must travel only in the `Token`
header and appear nowhere in results, logs, stdout/stderr or exception text."""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from visearch.detectors.gdino_cloud import GDinoCloudDetector, build, encode_image, load_token, normalize_endpoint
from visearch.errors import DetectorError, UsageError
from visearch.registry import load_detector

TOKEN = "tok-SECRET-5f1c9e2a7b"
CREATE = "/v2/task/grounding_dino/detection"
STATUS = "/v2/task_status/"


class FakeDDS:
    """Scripted provider. `create` / `poll` are queues of (http_status, body or None for no JSON, delay_s);
    when a queue is empty the normal answer is given (create -> task, poll -> success with `objects`)."""

    def __init__(self) -> None:
        self.create: list[tuple[int, object, float]] = []
        self.poll: list[tuple[int, object, float]] = []
        self.objects = [{"bbox": [10, 20, 110, 70], "score": 0.9, "category": "Red Jacket"},
                        {"bbox": [5, 5, 40, 40], "score": 0.95, "category": "bag"}]
        self.requests: list[dict] = []
        self.upload_sizes: list[tuple[int, int]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _answer(self, queue, default):
                status, body, delay, *extra = queue.pop(0) if queue else (200, default, 0.0)
                if delay:
                    time.sleep(delay)
                raw = (json.dumps(body) if body is not None else "<html>bad gateway</html>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (extra[0] if extra else {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _record(self, body_text: str) -> None:
                fake.requests.append({"method": self.command, "path": self.path,
                                      "headers": {k: v for k, v in self.headers.items()}, "body": body_text})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                text = self.rfile.read(n).decode()
                self._record(text)
                if self.path != CREATE:
                    return self._answer([(404, {"code": 404, "msg": "not found"}, 0)], None)
                body = json.loads(text)
                head, b64 = body["image"].split(",", 1)
                assert head == "data:image/jpeg;base64"
                fake.upload_sizes.append(Image.open(io.BytesIO(base64.b64decode(b64))).size)
                self._answer(fake.create, {"code": 0, "msg": "ok", "data": {"task_uuid": "task-0001"}})

            def do_GET(self):
                self._record("")
                if not self.path.startswith(STATUS):
                    return self._answer([(404, {"code": 404, "msg": "not found"}, 0)], None)
                self._answer(fake.poll, {"code": 0, "msg": "ok", "data": {
                    "status": "success", "result": {"objects": fake.objects}}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeDDS()
    yield f
    f.close()


@pytest.fixture
def sleeps():
    return []


@pytest.fixture(autouse=True)
def _no_leak(caplog, capsys):
    """Every test: all loggers at DEBUG, and afterwards the token must be in no log record and no output."""
    caplog.set_level(logging.DEBUG)
    yield
    out = capsys.readouterr()
    assert TOKEN not in caplog.text
    assert TOKEN not in out.out and TOKEN not in out.err


def _det(fake: FakeDDS, sleeps: list, **kw) -> GDinoCloudDetector:
    opts = {"token": TOKEN, "endpoint": fake.url, "poll_interval": 0.0, "backoff": 0.01, "max_retries": 3,
            "sleep": sleeps.append}
    opts.update(kw)
    return GDinoCloudDetector(**opts)


def _img(h: int = 240, w: int = 320) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _raises(fn, match: str) -> DetectorError:
    with pytest.raises(DetectorError, match=match) as e:
        fn()
    text = str(e.value) + repr(e.value) + str(e.value.hint)
    assert TOKEN not in text
    # no chained requests/urllib3 exception (their text may carry URLs or headers) is shown with ours
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    assert "\n" not in e.value.message
    return e.value


def _token_only_in_header(fake: FakeDDS) -> None:
    assert fake.requests
    for r in fake.requests:
        assert r["headers"].get("Token") == TOKEN
        assert TOKEN not in r["path"] and TOKEN not in r["body"]
        assert all(TOKEN not in v for k, v in r["headers"].items() if k != "Token")


# --- the normal path ----------------------------------------------------------------------------------------------
def test_detect_success_protocol(fake, sleeps):
    det = _det(fake, sleeps)
    fake.poll = [(200, {"code": 0, "msg": "ok", "data": {"status": "waiting"}}, 0),
                 (200, {"code": 0, "msg": "ok", "data": {"status": "running"}}, 0)]
    boxes = det.detect(_img(), "Red jacket")
    assert [b.to_dict() for b in boxes] == [
        {"box": [5.0, 5.0, 40.0, 40.0], "score": 0.95, "label": "bag"},
        {"box": [10.0, 20.0, 110.0, 70.0], "score": 0.9, "label": "red jacket"}]
    create, *polls = fake.requests
    assert create["method"] == "POST" and create["path"] == CREATE
    body = json.loads(create["body"])
    assert body["model"] == "GroundingDino-1.6-Pro"
    assert body["prompt"] == {"type": "text", "text": "red jacket . main object . key object . logo ."}
    assert body["targets"] == ["bbox"] and body["bbox_threshold"] == 0.25 and body["iou_threshold"] == 0.8
    assert re.fullmatch(r"[0-9a-f]{32}", create["headers"]["Idempotency-Key"])
    assert create["headers"]["Content-Type"] == "application/json"
    assert [p["path"] for p in polls] == [STATUS + "task-0001"] * 3
    assert fake.upload_sizes == [(320, 240)]  # small images are sent at full size
    _token_only_in_header(fake)
    assert TOKEN not in repr(det) and TOKEN not in str(boxes)
    # each task gets its own idempotency key
    det.detect(_img(), "bag")
    keys = [r["headers"]["Idempotency-Key"] for r in fake.requests if r["method"] == "POST"]
    assert len(set(keys)) == 2


def test_large_image_shrunk_and_boxes_scaled_back(fake, sleeps):
    fake.objects = [{"bbox": [768, 256, 1536, 1024], "score": 0.5, "category": "car"},
                    {"bbox": [-10, 0, 1600, 10], "score": 0.4, "category": "sky"}]
    boxes = _det(fake, sleeps).detect(_img(2000, 3000), None)
    assert fake.upload_sizes == [(1536, 1024)]
    assert boxes[0].as_list() == pytest.approx([1500, 500, 3000, 2000])
    assert boxes[1].as_list() == pytest.approx([0, 0, 3000, 10 * 2000 / 1024])  # clipped to the image


def test_encode_image_scale():
    uri, sx, sy = encode_image(_img(100, 3100), max_side=1536)
    assert uri.startswith("data:image/jpeg;base64,")
    w, h = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size
    assert (w, h) == (1536, 50) and sx == pytest.approx(3100 / 1536) and sy == pytest.approx(2.0)


# --- retries ------------------------------------------------------------------------------------------------------
def test_retries_on_5xx_429_and_busy_code_with_same_idempotency_key(fake, sleeps):
    fake.create = [(503, {"code": 503, "msg": "down"}, 0), (429, {"code": 429, "msg": "slow down"}, 0),
                   (200, {"code": 202001, "msg": "busy"}, 0)]
    fake.poll = [(502, None, 0)]
    boxes = _det(fake, sleeps).detect(_img(), "bag")
    assert len(boxes) == 2
    posts = [r for r in fake.requests if r["method"] == "POST"]
    assert len(posts) == 4 and len({p["headers"]["Idempotency-Key"] for p in posts}) == 1
    assert sleeps == pytest.approx([0.01, 0.02, 0.04, 0.01])  # backoff per call, then the poll's own retry


def test_retry_after_is_honoured_but_capped(fake, sleeps):
    fake.create = [(429, {"code": 429, "msg": "rate"}, 0, {"Retry-After": "30"}),
                   (503, {"code": 503, "msg": "x"}, 0, {"Retry-After": "0.2"})]
    _det(fake, sleeps, max_backoff=0.5).detect(_img(), "bag")
    assert sleeps == [0.5, 0.2]


def test_retries_exhausted(fake, sleeps):
    fake.create = [(503, {"code": 0, "msg": "x"}, 0)] * 10
    e = _raises(lambda: _det(fake, sleeps, max_retries=2).detect(_img(), "bag"), "unavailable after 3 tries")
    assert "HTTP 503" in e.message
    assert len(fake.requests) == 3 and len(sleeps) == 2


def test_read_timeout_is_retried(fake, sleeps):
    fake.create = [(200, {"code": 0, "data": {"task_uuid": "late"}}, 1.0)]
    det = _det(fake, sleeps, timeout=0.2)
    assert len(det.detect(_img(), "bag")) == 2
    assert len([r for r in fake.requests if r["method"] == "POST"]) == 2 and len(sleeps) == 1


def test_connection_refused(sleeps):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    det = GDinoCloudDetector(TOKEN, f"http://127.0.0.1:{port}", max_retries=1, sleep=sleeps.append, backoff=0.0)
    e = _raises(lambda: det.detect(_img(), "bag"), "cannot connect to http://127.0.0.1")
    assert "after 2 tries" in e.message


# --- errors that are not retried ----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors(fake, sleeps, status):
    # a server that echoes the token back must not get it into our message
    fake.create = [(status, {"code": status, "msg": f"invalid token {TOKEN}"}, 0)]
    e = _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), f"refused the API token \\(HTTP {status}")
    assert "***" in e.message and "VISEARCH_GDINO_TOKEN" in e.hint
    assert len(fake.requests) == 1 and sleeps == []


def test_redirect_is_not_followed(fake, sleeps):
    # a redirect would make requests send the custom Token header to another host: refused, not followed
    fake.create = [(307, {"code": 0}, 0, {"Location": "https://user:pw@evil.example.com/steal?x=1"})]
    e = _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"),
                "redirects \\(HTTP 307\\) to https://evil.example.com;")
    assert "pw" not in e.message and "steal" not in e.message
    assert len(fake.requests) == 1


def test_out_of_quota(fake, sleeps):
    fake.create = [(200, {"code": 40001, "msg": "Token out of Quota"}, 0)]
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), "out of quota")
    assert len(fake.requests) == 1
    fake.create = [(429, {"code": 429, "msg": "Token out of Quota"}, 0)]  # not retried even as a 429
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), "out of quota")
    assert len(fake.requests) == 2 and sleeps == []


def test_failed_task_and_other_codes(fake, sleeps):
    fake.poll = [(200, {"code": 0, "data": {"status": "failed", "error": "image decode error"}}, 0)]
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), "task task-0001 failed: image decode error")
    fake.create = [(200, {"code": 12345, "msg": "invalid model"}, 0)]
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), "code 12345: invalid model")
    fake.create = [(400, {"code": 400, "msg": "bad request"}, 0)]
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), "HTTP 400: bad request")


@pytest.mark.parametrize("where,answer,match", [
    ("create", (200, None, 0), "not a JSON envelope"),
    ("create", (200, {"msg": "no code"}, 0), "not a JSON envelope"),
    ("create", (200, {"code": 0, "data": {}}, 0), "no valid `task_uuid`"),
    ("create", (200, {"code": 0, "data": {"task_uuid": "../../etc"}}, 0), "no valid `task_uuid`"),
    ("create", (200, {"code": 0, "data": [1, 2]}, 0), "`data` is not an object"),
    ("poll", (200, {"code": 0, "data": {"status": "exploded"}}, 0), "task status 'exploded'"),
    ("poll", (200, {"code": 0, "data": {"status": "success", "result": {}}}, 0), "`result.objects` is not a list"),
    ("poll", (200, {"code": 0, "data": {"status": "success", "result": {"objects": [{"bbox": [1, 2, 3]}]}}}, 0),
     "object 0 has no valid bbox"),
    ("poll", (200, {"code": 0, "data": {"status": "success",
                                        "result": {"objects": [{"bbox": [1, 2, 3, "x"], "score": 1}]}}}, 0),
     "object 0 has no valid bbox"),
])
def test_malformed_answers(fake, sleeps, where, answer, match):
    getattr(fake, where).append(answer)
    _raises(lambda: _det(fake, sleeps).detect(_img(), "bag"), match)


def test_poll_timeout(fake, sleeps):
    fake.poll = [(200, {"code": 0, "data": {"status": "running"}}, 0)] * 50
    now = [0.0]

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    det = _det(fake, sleeps, sleep=sleep, clock=lambda: now[0], poll_interval=1.0, poll_timeout=5.0)
    _raises(lambda: det.detect(_img(), "bag"), "not finished after 5 s")
    assert 5 <= len([r for r in fake.requests if r["method"] == "GET"]) <= 7


# --- configuration ------------------------------------------------------------------------------------------------
def test_endpoint_normalisation(monkeypatch):
    monkeypatch.delenv("VISEARCH_GDINO_ENDPOINT", raising=False)
    assert normalize_endpoint(None) == "https://api.deepdataspace.com"
    assert normalize_endpoint("api.example.com/") == "https://api.example.com"
    assert normalize_endpoint("http://127.0.0.1:8765") == "http://127.0.0.1:8765"
    monkeypatch.setenv("VISEARCH_GDINO_ENDPOINT", "eu.example.org")
    assert normalize_endpoint(None) == "https://eu.example.org"
    with pytest.raises(UsageError) as e:
        normalize_endpoint("ftp://user:pw@host")
    assert "pw" not in str(e.value)


def test_token_sources(tmp_path, monkeypatch, fake, sleeps):
    monkeypatch.delenv("VISEARCH_GDINO_TOKEN", raising=False)
    with pytest.raises(UsageError, match="needs an API token"):
        load_token()
    f = tmp_path / "token.txt"
    f.write_text(f"  {TOKEN}\n")
    assert load_token(token_file=f) == TOKEN
    monkeypatch.setenv("VISEARCH_GDINO_TOKEN", TOKEN)
    assert load_token() == TOKEN
    f.write_text(f"{TOKEN}\nsecond line")
    with pytest.raises(UsageError, match="malformed") as e:
        load_token(token_file=f)
    assert TOKEN not in str(e.value)
    with pytest.raises(UsageError, match="cannot read token file"):
        load_token(token_file=tmp_path / "missing")
    # the registry path, with the test knobs passed through
    det = load_detector("gdino-cloud", endpoint=fake.url, weights_dir="w", device="cpu", box_threshold=0.3,
                        text_threshold=None, poll_interval=0.0, sleep=sleeps.append)
    assert len(det.detect(_img(), "bag")) == 2
    assert json.loads(fake.requests[0]["body"])["bbox_threshold"] == 0.3
    _token_only_in_header(fake)
    with pytest.raises(UsageError, match="text_threshold"):
        build(endpoint=fake.url, text_threshold=0.2)
    with pytest.raises(UsageError, match="unknown cloud detector model"):
        build(endpoint=fake.url, model="GroundingDino-9")


def test_empty_prompt_makes_no_request(fake, sleeps):
    det = _det(fake, sleeps, default_prompt="")
    assert det.detect(_img(), None) == [] and fake.requests == []
