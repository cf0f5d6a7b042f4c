"""Weights manager: manifest, downloads against a real local HTTP server (Range/resume), offline errors, verify."""
from __future__ import annotations

import hashlib
import os
import pickle
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from visearch import weight_files as W
from visearch.errors import UsageError, WeightsError

# ---- a real HTTP server on 127.0.0.1 serving one file, with Range support and byte accounting ------------------------

class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.sent = 0                   # body bytes written to clients
        self.requests: list[dict] = []  # per request: path, range header, status
        self.cut_after: int | None = None  # close the connection after this many body bytes (once)
        self.ignore_range = False       # behave like a server without Range support


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            data = state.files.get(name)
            if data is None:
                state.requests.append({"path": self.path, "range": rng, "status": 404})
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    state.requests.append({"path": self.path, "range": rng, "status": 416})
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                status = 206
            else:
                self.send_response(200)
                status = 200
            state.requests.append({"path": self.path, "range": rng, "status": status})
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.cut_after is not None:
                body = body[: state.cut_after]
                state.cut_after = None
                self.close_connection = True
            for i in range(0, len(body), 8192):
                self.wfile.write(body[i:i + 8192])
                state.sent += len(body[i:i + 8192])
            self.wfile.flush()

    return Handler


@pytest.fixture()
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}/mirror"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    """A port nothing listens on (bound, then released), so connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint_bytes(tmp_path: Path, seed: int = 0) -> bytes:
    """A small real checkpoint in the official style (dict with `state`), ~300 kB."""
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"ckpt_{seed}.pt"
    torch.save({"state": {"w": torch.randn(256, 300, generator=g), "b": torch.zeros(256)}}, path)
    return path.read_bytes()


def _write_manifest(tmp_path: Path, monkeypatch, data: bytes, *, sha: str | None = None, size: int | None = None,
                    file: str = "blob.pt") -> None:
    """A one-item manifest (`test-item` -> `file`) with the given expected hash/size, made the active manifest."""
    path = tmp_path / "manifest.toml"
    path.write_text(
        "schema = 1\n[[item]]\n"
        f'name = "test-item"\nfile = "{file}"\nkind = "file"\n'
        'urls = ["http://127.0.0.1:9/never-used"]\n'
        f'size = {size if size is not None else 0}\nsha256 = "{sha or ""}"\n'
        'license = "test"\nused_by = ["testmodel"]\n'
        '[models]\ntestmodel = ["test-item"]\nlite = []\n'
    )
    monkeypatch.setenv(W.MANIFEST_ENV, str(path))


# ---- manifest ---------------------------------------------------------------------------------------------------------

def test_manifest_lists_published_items():
    specs = {s.name: s for s in W.manifest()}
    assert specs["superglobal-r50"].file == "CVPR2022_CVNet_R50.pyth"
    assert specs["superglobal-r101"].file == "CVPR2022_CVNet_R101.pyth"
    assert specs["superglobal-r50"].urls == (
        "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/CVPR2022_CVNet_R50.pyth",)
    assert specs["superglobal-r101"].gdrive_folder == "1gMbZ8JlTyPlH2-6HW5NHRe58LmKfJybx"
    for name, file in [("ames-detector", "cvnet_detector.pt"), ("ames-float", "r101_cvnet_ames.pt"),
                       ("ames-dist", "cvnet_ames_dist.pt"), ("ames-itq", "itq_r101_cvnet_D128.npz")]:
        assert specs[name].file == file
        assert specs[name].urls == (f"http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/{file}",)
    assert specs["grounding-dino-tiny"].kind == "hf-folder"
    assert specs["grounding-dino-tiny"].hf_repo == "IDEA-Research/grounding-dino-tiny"
    assert specs["grounding-dino-base"].hf_repo == "IDEA-Research/grounding-dino-base"
    assert all(s.license for s in specs.values())
    # nothing is known about hashes yet: unknown must read as None, not as an empty expected value
    assert specs["superglobal-r50"].sha256 is None and specs["superglobal-r50"].size is None


def test_model_requirements():
    assert W.items_for("lite") == []
    assert [s.name for s in W.items_for("superglobal")] == ["superglobal-r101"]
    assert [s.name for s in W.items_for("superglobal-r50")] == ["superglobal-r50"]
    assert {s.name for s in W.items_for("ames")} == {"superglobal-r101", "ames-detector", "ames-dist", "ames-itq"}
    assert {s.name for s in W.items_for("ames-float")} == {"superglobal-r101", "ames-detector", "ames-float"}
    assert "ames-itq" in {s.name for s in W.items_for("ames-dist")}
    assert [s.name for s in W.items_for("gdino")] == ["grounding-dino-tiny"]
    assert [s.name for s in W.items_for("ames-itq")] == ["ames-itq"]
    with pytest.raises(UsageError, match="unknown"):
        W.items_for("no-such-model")
    with pytest.raises(UsageError, match="known: superglobal-r50"):
        W.download("no-such-item", "/nonexistent")


def test_mirror_env_overrides_sources(monkeypatch):
    monkeypatch.setenv(W.MIRROR_ENV, "http://mirror.example/w/")
    assert W.get_spec("superglobal-r101").sources() == ["http://mirror.example/w/CVPR2022_CVNet_R101.pyth"]


# ---- downloads ----------------------------------------------------------------------------------------------------

def test_full_download_with_progress_and_hash(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    wdir = tmp_path / "w"
    calls = []
    seen_final_early = []

    def progress(done, total):
        calls.append((done, total))
        seen_final_early.append((wdir / "blob.pt").exists())  # atomic: no final file while bytes arrive

    path = W.download("test-item", wdir, progress=progress)
    assert path == wdir / "blob.pt"
    assert path.read_bytes() == data
    assert not (wdir / "blob.pt.part").exists()
    assert calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert not any(seen_final_early)
    assert server.sent == len(data)
    # already present and matching: not fetched again
    W.download("test-item", wdir)
    assert len(server.requests) == 1


def test_real_manifest_item_through_mirror(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path, seed=3)
    server.files["cvnet_detector.pt"] = data
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    path = W.download("ames-detector", tmp_path)
    assert path.read_bytes() == data
    assert server.requests[0]["path"] == "/mirror/cvnet_detector.pt"
    st = {s.spec.name: s for s in W.status(tmp_path)}
    assert st["ames-detector"].present and st["ames-detector"].size == len(data)
    assert not st["ames-float"].present and st["ames-float"].size == 0


def test_resume_from_partial_file(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    k = len(data) * 2 // 5
    (tmp_path / "blob.pt.part").write_bytes(data[:k])
    calls = []
    path = W.download("test-item", tmp_path, progress=lambda d, t: calls.append((d, t)))
    assert path.read_bytes() == data
    assert server.requests[0]["range"] == f"bytes={k}-" and server.requests[0]["status"] == 206
    assert server.sent == len(data) - k  # only the missing bytes crossed the wire
    assert calls[0] == (k, len(data))


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    server.cut_after = 100_000
    with pytest.raises(WeightsError) as e:
        W.download("test-item", tmp_path)
    assert "resume" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "blob.pt").exists()  # atomic: nothing under the final name
    assert (tmp_path / "blob.pt.part").stat().st_size == 100_000
    W.download("test-item", tmp_path)
    assert (tmp_path / "blob.pt").read_bytes() == data
    assert server.sent == len(data)  # 100 kB + the rest, nothing twice


def test_complete_part_with_unknown_size_is_finished_without_refetch(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data)  # size and hash unknown
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    (tmp_path / "blob.pt.part").write_bytes(data)
    assert W.download("test-item", tmp_path).read_bytes() == data
    assert [r["status"] for r in server.requests] == [416] and server.sent == 0


def test_server_without_range_support_restarts_cleanly(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    server.ignore_range = True
    _write_manifest(tmp_path, monkeypatch, data, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    (tmp_path / "blob.pt.part").write_bytes(b"x" * 1000)  # must not be kept in front of a full 200 body
    assert W.download("test-item", tmp_path).read_bytes() == data


def test_hash_mismatch_leaves_nothing(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data, sha="0" * 64, size=len(data))
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    with pytest.raises(WeightsError, match="sha256") as e:
        W.download("test-item", tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "blob.pt").exists()
    assert not (tmp_path / "blob.pt.part").exists()


def test_size_mismatch_announced_by_server(server, tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    server.files["blob.pt"] = data
    _write_manifest(tmp_path, monkeypatch, data, size=len(data) + 1)
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    with pytest.raises(WeightsError, match="expects"):
        W.download("test-item", tmp_path)
    assert not (tmp_path / "blob.pt").exists()


def test_http_404_is_reported(server, tmp_path, monkeypatch):
    monkeypatch.setenv(W.MIRROR_ENV, server.base)
    with pytest.raises(WeightsError, match="404"):
        W.download("ames-float", tmp_path)
    assert not (tmp_path / "r101_cvnet_ames.pt").exists()


def test_offline_is_one_line_with_path_and_url(tmp_path, monkeypatch):
    base = f"http://127.0.0.1:{_free_port()}/w"
    monkeypatch.setenv(W.MIRROR_ENV, base)
    with pytest.raises(WeightsError) as e:
        W.download("superglobal-r50", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "offline" in msg
    assert str(tmp_path / "CVPR2022_CVNet_R50.pyth") in msg
    assert f"{base}/CVPR2022_CVNet_R50.pyth" in msg
    assert not (tmp_path / "CVPR2022_CVNet_R50.pyth").exists()


def test_offline_hub_folder_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv(W.HF_ENDPOINT_ENV, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(WeightsError) as e:
        W.download("grounding-dino-tiny", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg
    assert str(tmp_path / "grounding-dino-tiny") in msg and "IDEA-Research/grounding-dino-tiny" in msg
    assert not (tmp_path / "grounding-dino-tiny").exists()


# ---- verify -------------------------------------------------------------------------------------------------------

class _Custom:
    def __init__(self) -> None:
        self.x = 1


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_verify_good_truncated_and_code_carrying_files(tmp_path):
    # a valid checkpoint under the detector's name
    good = tmp_path / "cvnet_detector.pt"
    good.write_bytes(_checkpoint_bytes(tmp_path))
    # a truncated one under the float AMES name
    data = _checkpoint_bytes(tmp_path, seed=1)
    (tmp_path / "r101_cvnet_ames.pt").write_bytes(data[: len(data) // 2])
    # torch.save of an object of a custom class under the dist name
    torch.save({"state": _Custom()}, tmp_path / "cvnet_ames_dist.pt")
    # a raw pickle whose __reduce__ would run a shell command, under the R50 name
    marker = tmp_path / "pwned"
    with open(tmp_path / "CVPR2022_CVNet_R50.pyth", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    # a valid ITQ projection
    np.savez(tmp_path / "itq_r101_cvnet_D128.npz", proj=np.zeros((1024, 128), np.float32))

    res = {r.spec.name: r for r in W.verify(tmp_path)}
    assert set(res) == {"ames-detector", "ames-float", "ames-dist", "superglobal-r50", "ames-itq"}
    assert res["ames-detector"].ok, res["ames-detector"].message
    assert "unknown" in res["ames-detector"].message
    assert res["ames-itq"].ok
    assert not res["ames-float"].ok and "truncated" in res["ames-float"].message
    assert not res["ames-dist"].ok and "refusing" in res["ames-dist"].message
    assert not res["superglobal-r50"].ok
    assert not marker.exists()  # the pickled command never ran
    assert all("\n" not in r.message for r in res.values())

    full = {r.spec.name: r for r in W.verify(tmp_path, include_missing=True)}
    assert not full["superglobal-r101"].ok and "not downloaded" in full["superglobal-r101"].message
    only = W.verify(tmp_path, names=["ames-detector"])
    assert [r.spec.name for r in only] == ["ames-detector"]


def test_verify_checks_known_size_and_hash(tmp_path, monkeypatch):
    data = _checkpoint_bytes(tmp_path)
    _write_manifest(tmp_path, monkeypatch, data, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    (tmp_path / "blob.pt").write_bytes(data)
    [r] = W.verify(tmp_path)
    assert r.ok and "sha256 checked" in r.message
    (tmp_path / "blob.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    [r] = W.verify(tmp_path)
    assert not r.ok and "sha256" in r.message
    (tmp_path / "blob.pt").write_bytes(data[:-10])
    [r] = W.verify(tmp_path)
    assert not r.ok and f"expected {len(data)}" in r.message


def test_verify_truncated_npz_and_hub_folder(tmp_path):
    np.savez(tmp_path / "full.npz", proj=np.ones((1024, 128), np.float32))
    blob = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "itq_r101_cvnet_D128.npz").write_bytes(blob[: len(blob) // 2])
    folder = tmp_path / "grounding-dino-tiny"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "grounding-dino"}')
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    res = {r.spec.name: r for r in W.verify(tmp_path)}
    assert not res["ames-itq"].ok
    assert res["grounding-dino-tiny"].ok, res["grounding-dino-tiny"].message
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    res = {r.spec.name: r for r in W.verify(tmp_path)}
    assert not res["grounding-dino-tiny"].ok and "truncated" in res["grounding-dino-tiny"].message
