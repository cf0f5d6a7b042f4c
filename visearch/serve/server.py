"""Run the server: host/token policy, uvicorn, the browser for `visearch ui`, clean shutdown on Ctrl-C / SIGTERM."""
from __future__ import annotations

import ipaddress
import logging
import sys
import threading
import time
from pathlib import Path

from ..errors import UsageError
from .service import SearchService, ServeOptions

log = logging.getLogger("visearch.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The bearer token: the file's first line, stripped (at least 16 characters)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the token file {p}: {getattr(e, 'strerror', None) or e}") from None
    token = (text.strip().splitlines() or [""])[0].strip()
    if len(token) < 16:
        raise UsageError(f"the token in {p} is too short ({len(token)} characters)",
                         "use at least 16 random characters, e.g. `python -c 'import secrets; print(secrets.token_hex())'`")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"the token in {p} holds spaces or control characters")
    return token


def page_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _open_browser_when_up(server, url: str) -> None:
    import webbrowser

    for _ in range(600):
        if server.started or server.should_exit:
            break
        time.sleep(0.05)
    if not server.started:
        return
    try:
        if not webbrowser.open(url):
            sys.stderr.write(f"no browser found: open {url} yourself\n")
    except Exception as e:  # noqa: BLE001 - a missing browser is not an error of the server
        sys.stderr.write(f"could not open a browser ({type(e).__name__}): open {url} yourself\n")


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8421, token_file: str | Path | None = None,
          open_browser: bool = False, quiet: bool = False) -> None:
    """Load everything, then serve until SIGINT / SIGTERM (uvicorn's own handlers: running requests finish)."""
    token = read_token(token_file) if token_file is not None else None
    if token is None and not is_loopback(host):
        raise UsageError(f"binding {host} makes the server reachable from other machines: it needs --token-file",
                         "put a random token in a file and pass --token-file FILE (clients send "
                         "Authorization: Bearer <token>), or bind 127.0.0.1")
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be from 0 to 65535, got {port}")
    import uvicorn

    from .app import create_app

    t0 = time.perf_counter()
    service = SearchService(options)
    from .app import LOOPBACK_HOSTS

    # loopback without a token: only loopback Host names (DNS rebinding); with a token the token guards everything
    app = create_app(service, token, allowed_hosts=None if token else LOOPBACK_HOSTS | {host})
    pairs = ", ".join(f"{d} [{m}]" for d, m in service.searchers)
    url = page_url(host, port)
    if not quiet:
        note = " (token required on /api/)" if token else ""
        sys.stderr.write(f"loaded {pairs} in {time.perf_counter() - t0:.1f} s\nserving {url}{note}  (Ctrl-C to stop)\n")
        sys.stderr.flush()
    import copy

    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # logs go to stderr, never stdout
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info", log_config=log_config,
                            access_log=not quiet, timeout_graceful_shutdown=10, server_header=False,
                            lifespan="off")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # Ctrl-C / SIGTERM is how this server is meant to stop: finish cleanly (exit 0), do not re-raise it
            getattr(self, "_captured_signals", []).clear()

    server = _Server(config)
    if open_browser:
        threading.Thread(target=_open_browser_when_up, args=(server, url), daemon=True).start()
    try:
        server.run()
    finally:
        service.close()
    if server.started and not quiet:
        sys.stderr.write("stopped\n")
    if not server.started:
        raise UsageError(f"could not listen on {host}:{port}", "is the port in use? pick another with --port")
