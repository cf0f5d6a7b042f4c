"""FastAPI routes of `visearch serve`: the JSON API and the offline page.

    GET  /                                  the page (static/index.html; app.js and style.css beside it)
    GET  /api/health                        {"status": "ok", "datasets": {name: {"models": [...], "images": N}}, ...}
    POST /api/query                         multipart (image file + form fields) or JSON {"id": ...}: the object
                                            `visearch query --json` prints, plus "timings_ms"
    GET  /api/image/{dataset}/{id}?size=N   a JPEG thumbnail, looked up by id only

Errors are `{"error": "<one line>"}` with 400 (bad input), 401 (token), 404 (unknown dataset/model/detector/id),
413 (upload too large), 503 (busy); never a traceback. `create_app` returns a plain ASGI callable.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from importlib import resources
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DetectorError, ImageError, UsageError, VisearchError
from .service import Busy, NotFound, QueryRequest, SearchService, parse_bool, parse_box, parse_top_k

log = logging.getLogger("visearch.serve")

TOKEN_COOKIE = "visearch_token"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# the page loads nothing from elsewhere: no CDN, no web fonts (it works offline)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
QUERY_FIELDS = {"dataset", "model", "id", "prompt", "detector", "top_k", "box", "rerank"}


def status_of(e: VisearchError) -> int:
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, Busy):
        return 503
    if isinstance(e, (UsageError, ImageError)):
        return 400
    if isinstance(e, DetectorError):
        return 502
    return 500


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status, headers=headers)


async def _send_json(send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"connection", b"close")]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413 (from Content-Length before anything is read,
    or while streaming a chunked body). The rest of a refused body is drained up to `drain` bytes so the client
    reads the answer instead of a reset connection."""

    def __init__(self, app, limit: int, drain: int = 64 * 1024 * 1024):
        self.app, self.limit, self.drain = app, limit, drain

    def _message(self) -> str:
        return f"upload too large: the limit is {self.limit / 2**20:g} MB"

    async def _drain(self, receive, already: int) -> None:
        seen = already
        while seen < self.drain:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_json(send, 400, {"error": "bad Content-Length header"})
            if n > self.limit:
                await self._drain(receive, 0)
                return await _send_json(send, 413, {"error": self._message()})
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(self._message())
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._drain(receive, received)
                await _send_json(send, 413, {"error": self._message()})


class TokenGuard:
    """ASGI middleware: /api/ requests need `Authorization: Bearer <token>` (or the page's token cookie); 401
    otherwise. The page and its static files stay public (they hold no data) so a browser can ask for the token."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _ok(self, scope) -> bool:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.token):
            return True
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == TOKEN_COOKIE.encode():
                try:
                    got = unquote(value.decode("ascii")).encode()
                except UnicodeDecodeError:
                    return False
                return hmac.compare_digest(got, self.token)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/") and not self._ok(scope):
            return await _send_json(send, 401, {"error": "missing or wrong token: send Authorization: Bearer <token>"},
                                    {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class HostGuard:
    """ASGI middleware for a loopback server without a token: requests must name a loopback host (Host header), so a
    web page elsewhere cannot read this server through DNS rebinding (its name resolving to 127.0.0.1)."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts:
                return await _send_json(send, 400, {"error": "unexpected Host header: open the page by its loopback "
                                                             "address (http://127.0.0.1:PORT/)"})
        return await self.app(scope, receive, send)


class CatchAll:
    """Outermost ASGI wrapper: an unexpected exception becomes one log line (a 500 JSON answer was already sent by
    the app's handler), never a traceback on the console; VISEARCH_DEBUG=1 logs the traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except Exception as e:  # noqa: BLE001
            log.error("unexpected %s while answering %s: %s", type(e).__name__, scope.get("path"),
                      (str(e).splitlines() or [""])[0][:300], exc_info=bool(os.environ.get("VISEARCH_DEBUG")))


def _static(name: str) -> bytes:
    return resources.files("visearch.serve").joinpath("static", name).read_bytes()


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


def create_app(service: SearchService, token: str | None = None, allowed_hosts: set[str] | None = None):
    """The ASGI application serving `service` (token: required on /api/ when given; allowed_hosts: the Host names
    accepted, None = any)."""
    app = FastAPI(title="visearch", docs_url=None, redoc_url=None, openapi_url=None)
    static = {name: _static(name) for name in STATIC_FILES}  # read once: requests never reach the file system

    @app.exception_handler(VisearchError)
    async def _visearch_error(request: Request, e: VisearchError):
        return _error(status_of(e), str(e))

    @app.exception_handler(_TooLarge)
    async def _too_large(request: Request, e: _TooLarge):  # a chunked body passed the limit while being read
        return _error(413, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "bad request"
        if e.status_code == 404 and msg == "Not Found":
            msg = f"no such page: {request.url.path}"
        return _error(e.status_code, msg, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return _error(400, f"bad {where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return _error(500, f"internal error ({type(e).__name__}); the server log has details")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(static["index.html"], media_type=STATIC_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES or name == "index.html":
            raise NotFound(f"no such file: {name!r}")
        return Response(static[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.post("/api/query")
    async def query(request: Request) -> JSONResponse:
        req = await _read_query(request, service)
        fut = service.submit(req)
        return JSONResponse(await asyncio.wrap_future(fut))

    @app.get("/api/image/{dataset}/{image_id}")
    def image(dataset: str, image_id: str, size: int = 256) -> Response:
        data, (w, h) = service.thumbnail(dataset, image_id, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600", "X-Image-Size": f"{w},{h}"})

    inner = TokenGuard(app, token) if token else app
    inner = HostGuard(inner, allowed_hosts) if allowed_hosts is not None else inner
    return CatchAll(BodyLimit(inner, service.options.max_upload_bytes))


def _default_names(service: SearchService, dataset: Any, model: Any) -> tuple[str, str]:
    ds = str(dataset) if dataset not in (None, "") else next(iter(service.datasets))
    if model in (None, ""):
        models = [m for d, m in service.searchers if d == ds]
        model = models[0] if models else service.options.models[0]
    return ds, str(model)


async def _read_query(request: Request, service: SearchService) -> QueryRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UsageError("the JSON body must be an object")
        unknown = sorted(set(body) - QUERY_FIELDS)
        if unknown:
            raise UsageError(f"unknown field(s) {', '.join(unknown)}", f"known: {', '.join(sorted(QUERY_FIELDS))}")
        if body.get("id") in (None, ""):
            raise UsageError("a JSON query needs \"id\": a database image id (or send a photo as multipart)")
        fields, data, name = body, None, None
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=len(QUERY_FIELDS) + 1)
        fields = {k: v for k, v in form.items() if k != "image"}
        unknown = sorted(set(fields) - QUERY_FIELDS)
        if unknown:
            raise UsageError(f"unknown field(s) {', '.join(unknown)}", f"known: image, {', '.join(sorted(QUERY_FIELDS))}")
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            if fields.get("id"):
                data, name = None, None
            else:
                raise UsageError("no image: send the photo as the multipart file field \"image\"")
        else:
            data = await upload.read()
            name = os.path.basename(upload.filename or "upload") or "upload"
        await form.close()  # spooled temporary files go now, not at garbage collection
    else:
        raise UsageError("send multipart/form-data (field \"image\") or application/json (field \"id\")")
    ds, model = _default_names(service, fields.get("dataset"), fields.get("model"))
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UsageError("prompt must be a string")
    detector = fields.get("detector")
    if detector is not None and not isinstance(detector, str):
        raise UsageError("detector must be a string")
    image_id = fields.get("id") if data is None else None
    if image_id is not None and not isinstance(image_id, str):
        raise UsageError("id must be a string")
    return QueryRequest(dataset=ds, model=model, image_bytes=data, image_name=name or "upload", image_id=image_id,
                        prompt=prompt.strip() or None if prompt else None, detector=detector or None,
                        top_k=parse_top_k(fields.get("top_k", 5)), box=parse_box(fields.get("box")),
                        rerank=parse_bool(fields.get("rerank", True), "rerank"))
