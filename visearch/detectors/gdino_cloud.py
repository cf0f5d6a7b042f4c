"""Grounding DINO 1.5 / 1.6 Pro (and DINO-X) through DeepDataSpace's v2 REST API, called with `requests`.

Not the vendor SDK (it imports undeclared packages and sends the token to a third-party error tracker) and not the
unrelated PyPI placeholder named `gdino`. Protocol (see shared/reference/grounding-dino.md):

- create: `POST {endpoint}/v2/task/grounding_dino/detection`, headers `Token`, `Idempotency-Key` (one fresh hex uuid
  per task, reused by retries so a retried create does not run twice), `Content-Type: application/json`; body
  `{"model", "image": data URI, "prompt": {"type": "text", "text"}, "targets": ["bbox"], "bbox_threshold",
  "iou_threshold"}`; answer `{"code": 0, "msg", "data": {"task_uuid"}}`.
- poll: `GET {endpoint}/v2/task_status/{uuid}` until `data.status` is `success` (`data.result.objects`:
  `[{"bbox": [x0, y0, x1, y1], "score", "category"}]` in pixels of the uploaded image) or `failed` (`data.error`).
- `code` 202001, HTTP 429 and HTTP 5xx mean "try again": bounded retries with exponential backoff.

The token travels only in the `Token` header. It is never logged, never put in an exception, and any text that comes
back from the server or from `requests` is scrubbed of it before use.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import DetectorError, UsageError
from .base import DEFAULT_PROMPT, Box, Detector, check_image, check_options, normalize_prompt

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://api.deepdataspace.com"
ENDPOINT_ENV = "VISEARCH_GDINO_ENDPOINT"
TOKEN_ENV = "VISEARCH_GDINO_TOKEN"
DEFAULT_MODEL = "GroundingDino-1.6-Pro"
# model -> create path
MODELS = {
    "GroundingDino-1.5-Pro": "/v2/task/grounding_dino/detection",
    "GroundingDino-1.5-Edge": "/v2/task/grounding_dino/detection",
    "GroundingDino-1.6-Pro": "/v2/task/grounding_dino/detection",
    "GroundingDino-1.6-Edge": "/v2/task/grounding_dino/detection",
    "DINO-X-1.0": "/v2/task/dinox/detection",
}
STATUS_PATH = "/v2/task_status/{uuid}"
RETRY_CODE = 202001  # "busy, try again" in the answer envelope
MAX_SIDE = 1536  # the provider's SDK shrinks larger images to this long edge before upload
BOX_THRESHOLD = 0.25  # the provider's example values
IOU_THRESHOLD = 0.8
_TOKEN_OK = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: anything else cannot be an HTTP header value


def normalize_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $VISEARCH_GDINO_ENDPOINT, else the provider's; a bare host gets `https://`; no trailing /."""
    ep = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).strip()
    hint = "give a host (api.deepdataspace.com) or a URL (http://127.0.0.1:8765)"
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:/*", ep):  # a scheme without a host, e.g. "http://"
        raise UsageError(f"bad cloud detector endpoint {ep[:20]!r}: no host", hint)
    ep = ep.rstrip("/")
    if "://" not in ep:
        ep = "https://" + ep
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in ep):
        raise UsageError("bad cloud detector endpoint: it contains spaces or control characters", hint)
    try:
        parts = urlsplit(ep)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise UsageError(f"bad cloud detector endpoint {_display_endpoint(ep)!r} ({e})", hint) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad cloud detector endpoint {_display_endpoint(ep)!r}", hint)
    return ep


def _display_endpoint(ep: str) -> str:
    """scheme://host[:port] only: user:password@ or query strings in a URL never reach messages."""
    try:
        parts = urlsplit(ep)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}" if parts.scheme else host
    except ValueError:
        return "<unparsable endpoint>"


def load_token(token: str | None = None, token_file: str | Path | None = None) -> str:
    """The API token: `token`, else the contents of `token_file`, else $VISEARCH_GDINO_TOKEN. Whitespace around it is
    dropped. Raises UsageError (never showing the token) when none is found or it cannot be an HTTP header."""
    if token is None and token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read token file {token_file} ({type(e).__name__})") from None
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token or not token.strip():
        raise UsageError("the cloud detector needs an API token",
                         f"pass --token-file FILE or set {TOKEN_ENV}")
    token = token.strip()
    if not _TOKEN_OK.fullmatch(token):
        raise UsageError(f"the cloud API token is malformed ({len(token)} characters, some not printable ASCII "
                         "or whitespace)", "the token file must hold the token alone")
    return token


def encode_image(image: np.ndarray, max_side: int = MAX_SIDE, quality: int = 90) -> tuple[str, float, float]:
    """JPEG data URI of `image`, shrunk so its long edge is at most `max_side`; returns (uri, sx, sy) where
    original = uploaded * (sx, sy)."""
    from PIL import Image

    h, w = check_image(image)
    pil = Image.fromarray(image)
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        pil = pil.resize((nw, nh), Image.Resampling.LANCZOS)
    else:
        nw, nh = w, h
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return uri, w / nw, h / nh


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class GDinoCloudDetector(Detector):
    """Boxes from the hosted Grounding DINO 1.5 / 1.6 Pro. `sleep` and `clock` are injectable so tests run fast."""

    name = "gdino-cloud"

    def __init__(self, token: str, endpoint: str | None = None, model: str = DEFAULT_MODEL,
                 box_threshold: float = BOX_THRESHOLD, iou_threshold: float = IOU_THRESHOLD,
                 default_prompt: str | None = DEFAULT_PROMPT, timeout: float = 10.0, poll_interval: float = 0.5,
                 poll_timeout: float = 60.0, max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 8.0,
                 max_side: int = MAX_SIDE, session: Any = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        try:
            import requests
        except ImportError:
            raise DetectorError("the cloud detector needs the `requests` package", "pip install requests") from None
        if model not in MODELS:
            raise UsageError(f"unknown cloud detector model {model!r}", f"known: {', '.join(MODELS)}")
        if not 0.0 <= box_threshold <= 1.0 or not 0.0 <= iou_threshold <= 1.0:
            raise UsageError(f"thresholds must be in [0, 1], got box {box_threshold}, iou {iou_threshold}")
        self._token = load_token(token)
        self.endpoint = normalize_endpoint(endpoint)
        self.model = model
        self.box_threshold = float(box_threshold)
        self.iou_threshold = float(iou_threshold)
        self.default_prompt = default_prompt
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.poll_timeout = float(poll_timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_side = int(max_side)
        self._requests = requests
        self._session = session if session is not None else requests.Session()
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:  # the token is deliberately absent
        return f"GDinoCloudDetector(endpoint={_display_endpoint(self.endpoint)!r}, model={self.model!r})"

    # --- text hygiene -------------------------------------------------------------------------------------------
    def _scrub(self, text: Any, limit: int = 200) -> str:
        """One line of server/library text with the token removed, cut to `limit` characters."""
        s = " ".join(str(text).split())
        if self._token:
            s = s.replace(self._token, "***")
        return s[:limit] + ("..." if len(s) > limit else "")

    def _fail(self, message: str, hint: str | None = None) -> DetectorError:
        return DetectorError(self._scrub(message, 400), hint and self._scrub(hint, 400))

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def _once(self, method: str, url: str, headers: dict[str, str], body: dict | None) -> dict:
        """One request; returns the envelope's `data` dict, raises _Retry or DetectorError."""
        req = self._requests
        where = _display_endpoint(self.endpoint)
        try:
            # no redirects: requests would forward the custom Token header to whatever host a redirect names
            r = self._session.request(method, url, headers=headers, json=body, timeout=self.timeout,
                                      allow_redirects=False)
        except req.Timeout:
            raise _Retry(f"no answer from {where} within {self.timeout:g} s") from None
        except req.ConnectionError:
            raise _Retry(f"cannot connect to {where}") from None
        except req.RequestException as e:  # invalid URL, bad header...: not worth retrying
            raise self._fail(f"request to {where} failed ({type(e).__name__})") from None
        try:
            env = r.json()
        except ValueError:
            env = None
        msg = self._scrub(env.get("msg", "")) if isinstance(env, dict) else ""
        if "out of quota" in msg.lower():
            raise self._fail("the cloud API token is out of quota", "buy more quota or use --detector gdino/tiles")
        status = r.status_code
        if status in (401, 403):
            raise self._fail(f"the cloud detector refused the API token (HTTP {status}{': ' + msg if msg else ''})",
                             f"check the token in --token-file or {TOKEN_ENV}")
        if 300 <= status < 400:
            to = _display_endpoint(r.headers.get("Location", "")) if r.headers.get("Location") else "elsewhere"
            raise self._fail(f"the cloud endpoint {where} redirects (HTTP {status}) to {to}; the token is not "
                             "sent there", "give the final URL with --endpoint / " + ENDPOINT_ENV)
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status} from {where}", _retry_after(r.headers.get("Retry-After")))
        if status >= 400:
            raise self._fail(f"the cloud detector answered HTTP {status}{': ' + msg if msg else ''}")
        if not isinstance(env, dict) or not isinstance(env.get("code"), int):
            raise self._fail(f"malformed answer from {where}: not a JSON envelope with an integer `code`")
        if env["code"] == RETRY_CODE:
            raise _Retry(f"code {RETRY_CODE} (busy) from {where}")
        if env["code"] != 0:
            raise self._fail(f"the cloud detector answered code {env['code']}{': ' + msg if msg else ''}")
        data = env.get("data")
        if not isinstance(data, dict):
            raise self._fail(f"malformed answer from {where}: `data` is not an object")
        return data

    def _call(self, method: str, url: str, headers: dict[str, str], body: dict | None = None) -> dict:
        """`_once` with up to `max_retries` retries, waiting backoff * 2**attempt (capped, or Retry-After)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(method, url, headers, body)
            except _Retry as e:
                if attempt == self.max_retries:
                    raise self._fail(f"cloud detector unavailable after {attempt + 1} tries ({e.reason})",
                                     "try again later, or use --detector gdino/tiles") from None
                wait = min(self.max_backoff, e.wait if e.wait is not None else self.backoff * 2 ** attempt)
                log.info("cloud detector: %s; retry %d/%d in %.1f s", e.reason, attempt + 1, self.max_retries, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")

    # --- detection ----------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        """Boxes (xyxy pixels of `image`), best score first; `prompt` is combined with the default prompt."""
        h, w = check_image(image)
        text = normalize_prompt(prompt, self.default_prompt)
        if not text:
            return []
        uri, sx, sy = encode_image(image, self.max_side)
        body = {"model": self.model, "image": uri, "prompt": {"type": "text", "text": text},
                "targets": ["bbox"], "bbox_threshold": self.box_threshold, "iou_threshold": self.iou_threshold}
        headers = {"Token": self._token, "Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"}
        data = self._call("POST", self.endpoint + MODELS[self.model], headers, body)
        task = data.get("task_uuid")
        if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", task):
            raise self._fail("malformed answer from the cloud detector: no valid `task_uuid`")
        log.debug("cloud detector: task %s created", task)
        result = self._poll(task)
        return self._parse(result, w, h, sx, sy)

    def _poll(self, task: str) -> Any:
        url = self.endpoint + STATUS_PATH.format(uuid=task)
        deadline = self._clock() + self.poll_timeout
        while True:
            data = self._call("GET", url, {"Token": self._token})
            status = data.get("status")
            if status == "success":
                return data.get("result")
            if status == "failed":
                why = self._scrub(data.get("error") or "no reason given")
                raise self._fail(f"cloud detection task {task} failed: {why}")
            if status not in ("waiting", "running"):
                raise self._fail(f"malformed answer from the cloud detector: task status {self._scrub(status, 40)!r}")
            if self._clock() >= deadline:
                raise self._fail(f"cloud detection task {task} not finished after {self.poll_timeout:g} s",
                                 "try again later, or raise the poll timeout")
            self._sleep(self.poll_interval)

    def _parse(self, result: Any, w: int, h: int, sx: float, sy: float) -> list[Box]:
        """`{"objects": [{"bbox", "score", "category"}]}` in uploaded pixels -> boxes in original pixels."""
        objects = result.get("objects") if isinstance(result, dict) else None
        if not isinstance(objects, list):
            raise self._fail("malformed answer from the cloud detector: `result.objects` is not a list")
        boxes = []
        for i, obj in enumerate(objects):
            bbox = obj.get("bbox") if isinstance(obj, dict) else None
            score = obj.get("score") if isinstance(obj, dict) else None
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in bbox)
                    or not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score)):
                raise self._fail(f"malformed answer from the cloud detector: object {i} has no valid bbox/score")
            label = obj.get("category")
            label = " ".join(str(label).split()).lower() if label else "object"
            x0, x1 = (min(max(v * sx, 0.0), float(w)) for v in (bbox[0], bbox[2]))
            y0, y1 = (min(max(v * sy, 0.0), float(h)) for v in (bbox[1], bbox[3]))
            if x1 > x0 and y1 > y0:
                boxes.append(Box(x0, y0, x1, y1, float(score), label))
        boxes.sort(key=lambda b: -float(b.score or 0.0))
        return boxes


def _retry_after(value: str | None) -> float | None:
    """Seconds from a numeric Retry-After header (dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def build(token: str | None = None, token_file: str | Path | None = None, endpoint: str | None = None,
          model: str | None = None, box_threshold: float | None = None, iou_threshold: float | None = None,
          default_prompt: str | None = None, timeout: float | None = None, poll_timeout: float | None = None,
          max_retries: int | None = None, device: Any = None, weights_dir: Any = None,
          **options: Any) -> GDinoCloudDetector:
    """Options: `token` or `token_file` (else $VISEARCH_GDINO_TOKEN), `endpoint` (else $VISEARCH_GDINO_ENDPOINT, else
    https://api.deepdataspace.com), `model` ("GroundingDino-1.6-Pro"), `box_threshold` (0.25), `iou_threshold`
    (0.8), `default_prompt` (None = DEFAULT_PROMPT, "" = user prompt only), `timeout` (10 s per request),
    `poll_timeout` (60 s), `max_retries` (4). `device` and `weights_dir` are accepted and ignored."""
    # poll_interval / sleep / session are for tests and benchmarks: they pass through **options to the class.
    extra = {k: options.pop(k) for k in ("poll_interval", "backoff", "max_backoff", "sleep", "clock", "session",
                                        "max_side") if k in options}
    check_options("gdino-cloud", options)
    given = {"model": model, "box_threshold": box_threshold, "iou_threshold": iou_threshold, "timeout": timeout,
             "poll_timeout": poll_timeout, "max_retries": max_retries}
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    return GDinoCloudDetector(load_token(token, token_file), endpoint,
                         default_prompt=DEFAULT_PROMPT if default_prompt is None else default_prompt,
                         **kw, **{k: v for k, v in extra.items() if v is not None})
