"""Fast in-process checks of the server (FastAPI's TestClient over the real service and a real tiny store): input
parsing, the body limit on chunked uploads, 503 when the queue is full, the token policy, the offline page."""
import re
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tests.e2e.fast_cli import FAST_DESCRIBE, cli  # noqa: E402
from tests.e2e.servetools import serve_collection  # noqa: E402, F401
from visearch.errors import UsageError  # noqa: E402
from visearch.serve import server as srv_mod  # noqa: E402
from visearch.serve.app import create_app  # noqa: E402
from visearch.serve.service import (  # noqa: E402
    MAX_TOP_K,
    QueryRequest,
    SearchService,
    ServeOptions,
    parse_bool,
    parse_box,
    parse_top_k,
)

STATIC = ROOT / "visearch" / "serve" / "static"


@pytest.fixture(scope="module")
def service(serve_collection):
    """The real service over the collection the e2e fixture described with fast lite settings (same override), and
    a second dataset converted but never extracted."""
    cli("convert", serve_collection["photos"]["coins"].parent, "--name", "nostore", data=serve_collection["data"])
    from visearch import config

    def fast(cfg):
        return config.merge(cfg, {"describe": dict(FAST_DESCRIBE)}) if cfg.get("family") == "lite" else cfg

    with pytest.MonkeyPatch.context() as mp:  # the config hook only while this module runs
        mp.setattr(config, "_HOOKS", [*config._HOOKS, fast])
        svc = SearchService(ServeOptions(datasets=["shop", "nostore"], data_dir=serve_collection["data"], device="cpu",
                                         max_upload_bytes=256 * 1024, max_pending=1))
        yield svc
        svc.close()


def test_parsers():
    assert parse_box("1, 2,30.5,40") == (1.0, 2.0, 30.5, 40.0)
    assert parse_box([0, 0, 5, 5]) == (0.0, 0.0, 5.0, 5.0)
    assert parse_box("") is None and parse_box(None) is None
    for bad in ("1,2,3", "a,b,c,d", "0,0,nan,4", "5,0,1,4", "0,0,inf,4"):
        with pytest.raises(UsageError):
            parse_box(bad)
    assert parse_top_k("7") == 7 and parse_top_k(MAX_TOP_K) == MAX_TOP_K
    for bad in ("0", str(MAX_TOP_K + 1), "1.5", "", True):
        with pytest.raises(UsageError):
            parse_top_k(bad)
    assert parse_bool("false", "x") is False and parse_bool("1", "x") is True and parse_bool(True, "x") is True
    with pytest.raises(UsageError):
        parse_bool("maybe", "rerank")


def test_host_and_token_policy(tmp_path):
    assert srv_mod.is_loopback("127.0.0.1") and srv_mod.is_loopback("::1") and srv_mod.is_loopback("localhost")
    assert not srv_mod.is_loopback("0.0.0.0") and not srv_mod.is_loopback("192.168.1.4")
    short = tmp_path / "t"
    short.write_text("abc\n")
    with pytest.raises(UsageError, match="too short"):
        srv_mod.read_token(short)
    with pytest.raises(UsageError, match="cannot read"):
        srv_mod.read_token(tmp_path / "missing")
    good = tmp_path / "g"
    good.write_text("  0123456789abcdef0123\nignored\n")
    assert srv_mod.read_token(good) == "0123456789abcdef0123"
    with pytest.raises(UsageError, match="--token-file"):
        srv_mod.serve(ServeOptions(datasets=["x"]), host="0.0.0.0")


def test_chunked_upload_over_the_limit_gets_413(service, serve_collection):
    client = TestClient(create_app(service))

    def body():  # a generator: sent chunked, without Content-Length
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * 8192
        yield b"\r\n--xyz--\r\n"

    r = client.post("/api/query", content=body(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "0.25 MB" in r.json()["error"]
    small = serve_collection["photos"]["coins"].read_bytes()
    assert len(small) < 256 * 1024
    r = client.post("/api/query", files={"image": ("c.jpg", small)})
    assert r.status_code == 200 and r.json()["merged"][0]["id"].startswith("coins")


def test_full_queue_gets_503_and_health_still_answers(service, serve_collection):
    client = TestClient(create_app(service))
    gate = threading.Event()
    blocker = service._pool.submit(gate.wait)  # occupy the single worker
    photo = serve_collection["photos"]["rocket"].read_bytes()
    try:
        queued = service.submit(QueryRequest(dataset="shop", model="lite", image_bytes=photo))
        r = client.post("/api/query", files={"image": ("r.jpg", photo)})
        assert r.status_code == 503 and r.json()["error"].startswith("server busy")
        h = client.get("/api/health").json()
        assert h["queries"]["waiting"] == 1 and h["queries"]["max_pending"] == 1
    finally:
        gate.set()
    blocker.result(timeout=10)
    assert queued.result(timeout=60)["merged"][0]["id"].startswith("rocket")
    assert client.post("/api/query", files={"image": ("r.jpg", photo)}).status_code == 200


def test_form_and_json_validation(service):
    client = TestClient(create_app(service))
    assert client.post("/api/query", data={"dataset": "shop", "colour": "red"},
                       files={"image": ("a.jpg", b"x")}).status_code == 400
    assert client.post("/api/query", content=b"[1, 2]", headers={"Content-Type": "application/json"}).status_code == 400
    assert client.post("/api/query", content=b"id=x", headers={"Content-Type": "text/plain"}).status_code == 400
    r = client.post("/api/query", json={"id": 5})
    assert r.status_code == 400 and "id must be a string" in r.json()["error"]
    r = client.get("/api/image/shop/x", params={"size": "big"})
    assert r.status_code == 400 and list(r.json()) == ["error"]


def test_token_guard_in_process(service):
    token = "0123456789abcdef-token"
    client = TestClient(create_app(service, token))
    assert client.get("/api/health").status_code == 401
    assert client.get("/api/health", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert client.get("/api/health", headers={"Authorization": f"bearer {token}"}).status_code == 200
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200


def test_page_is_offline_and_served_with_a_strict_policy(service):
    client = TestClient(create_app(service))
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        # no CDN, no web fonts, no remote anything (the SVG namespace is an identifier, not a request)
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text) if "www.w3.org/2000/svg" not in u]
        assert urls == [], (name, urls)
        assert "@import" not in text and "@font-face" not in text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/nothing.js").status_code == 404


def test_a_dataset_without_store_is_listed_and_answers_404(service, serve_collection):
    client = TestClient(create_app(service))
    h = client.get("/api/health").json()
    assert list(h["datasets"]) == ["shop"] and list(h["unavailable"]) == ["nostore"]
    assert "extract" in h["unavailable"]["nostore"]["lite"]
    photo = serve_collection["photos"]["coins"].read_bytes()
    r = client.post("/api/query", files={"image": ("c.jpg", photo)}, data={"dataset": "nostore"})
    assert r.status_code == 404 and "no usable lite store" in r.json()["error"]


def test_loopback_server_refuses_foreign_host_names(service):
    from visearch.serve.app import LOOPBACK_HOSTS

    client = TestClient(create_app(service, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8421")
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"Host": "localhost:8421"}).status_code == 200
    r = client.get("/api/health", headers={"Host": "attacker.example:8421"})  # DNS rebinding: name -> 127.0.0.1
    assert r.status_code == 400 and "Host" in r.json()["error"]
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400
