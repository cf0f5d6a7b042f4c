"""Results a person can see: boxes drawn on an image, a PNG contact sheet per query, one HTML report for many.

Input is the query JSON object of `visearch query --json` (api.Searcher.query):
`{"query": path, "model": str, "crops": [{"box": [x0, y0, x1, y1], "label": str, "score": float | None,
"results": [{"rank", "id", "path", "score"}, ...]}, ...], "merged": [{"rank", "id", "path", "score"}, ...]}`.
Thumbnails come from `result["path"]` unless a `thumbs` loader is given. PIL only; a missing or unreadable image
becomes a grey placeholder tile (logged), so one bad file never loses a whole report.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .errors import ImageError, UsageError

log = logging.getLogger(__name__)

# Distinct colours for crop numbers 1, 2, ... (cycled); the whole-image crop uses the same rule.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (200, 200, 200)
MARGIN = 8
LABEL_WIDTH = 150  # left column of each crop row in the contact sheet
CAPTION_HEIGHT = 28  # two text lines under each thumbnail

ThumbLoader = Callable[[dict], Any]


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _loader(thumbs: Any) -> ThumbLoader:
    """A loader from a result dict: `thumbs` itself if callable; for a dataset-like object the result's `path` when
    that file exists, else `thumbs.image_path(id)` (the dataset's copy); else the result's `path`."""
    if thumbs is None:
        return lambda r: r.get("path")
    if callable(thumbs):
        return thumbs
    if hasattr(thumbs, "image_path"):
        def original_or_copy(r: dict) -> Any:
            # the user's original file while it is there; the dataset's own copy once it moved or was deleted
            path = r.get("path")
            if path and Path(path).is_file():
                return path
            return thumbs.image_path(r["id"]) if r.get("id") is not None else path

        return original_or_copy
    raise UsageError(f"thumbs must be a callable or have image_path(), got {type(thumbs).__name__}")


def _to_pil(x: Any, what: str) -> Image.Image | None:
    """RGB PIL image from a path / array / PIL image; None (logged) when missing or unreadable."""
    from .images import load_rgb

    if x is None:
        return None
    if isinstance(x, Image.Image) and x.mode == "RGB":
        return x
    try:
        return Image.fromarray(load_rgb(x))
    except (ImageError, OSError, ValueError) as e:
        log.warning("render: cannot show %s: %s", what, e)
        return None


def _fit(img: Image.Image | None, w: int, h: int, caption: str = "missing") -> Image.Image:
    """`img` scaled to fit `w x h` (aspect kept, never upscaled beyond 4x), centred on a white tile."""
    tile = Image.new("RGB", (w, h), BACKGROUND if img is not None else PLACEHOLDER)
    if img is None:
        ImageDraw.Draw(tile).text((4, h // 2 - 6), caption, fill=(80, 80, 80), font=_font(11))
        return tile
    s = min(w / img.width, h / img.height, 4.0)
    nw, nh = max(1, round(img.width * s)), max(1, round(img.height * s))
    tile.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    return tile


def _colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _fmt_score(s: Any) -> str:
    return "-" if s is None else f"{float(s):.3f}"


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _draw_numbered(img: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
                   scale: float = 1.0) -> Image.Image:
    """A copy of `img` with box i outlined in colour i and tagged "i+1" (plus label when given)."""
    out = img.copy()
    d = ImageDraw.Draw(out)
    font = _font(12)
    lw = max(2, round(min(out.size) / 200))
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) * scale for v in b)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(x1, out.width - 1), min(y1, out.height - 1)
        if x1 <= x0 or y1 <= y0:  # outside this image (e.g. boxes of another size): nothing to draw
            continue
        c = _colour(i)
        d.rectangle([x0, y0, x1, y1], outline=c, width=lw)
        tag = str(i + 1) + (f" {labels[i]}" if labels and labels[i] else "")
        tb = d.textbbox((0, 0), tag, font=font)
        tx, ty = x0 + lw, y0 + lw
        d.rectangle([tx, ty, tx + tb[2] - tb[0] + 6, ty + tb[3] - tb[1] + 6], fill=c)
        d.text((tx + 3, ty + 3 - tb[1]), tag, fill=(255, 255, 255), font=font)
    return out


def draw_boxes(image: Any, boxes: Sequence[Any], path: str | Path) -> Path:
    """Write `image` (path / array / PIL) with `boxes` (detectors.Box or [x0, y0, x1, y1]) numbered and labelled;
    the format follows the suffix of `path` (.jpg, .png, ...)."""
    img = _to_pil(image, str(image) if isinstance(image, (str, Path)) else "image")
    if img is None:
        raise ImageError(f"cannot read {image} to draw boxes on it")
    coords = [b.as_list() if hasattr(b, "as_list") else list(b) for b in boxes]
    labels = [getattr(b, "label", "") + (f" {b.score:.2f}" if getattr(b, "score", None) is not None else "")
              for b in boxes]
    return _save(_draw_numbered(img, coords, labels), path)


def _save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(path)
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot write {path}: {e}", "use a .png or .jpg file name in a writable folder") from None
    return path


def _query_pil(query: dict, query_image: Any) -> Image.Image | None:
    src = query_image if query_image is not None else query.get("query")
    return _to_pil(src, f"query {query.get('query')}")


def contact_sheet(query: dict, path: str | Path, thumbs: Any = None, *, query_image: Any = None,
                  thumb_size: int = 128, query_height: int = 320) -> Path:
    """One PNG for one query: a title line, the query image (at most `query_height` px high) with crop i's box
    drawn in colour i and numbered i+1, then one row per crop: its number, label and detector score, followed by
    its results as `thumb_size` square tiles captioned "rank. score" and the image id.

    `query` is the query JSON object (module docstring); `thumbs` loads a result's image (callable taking the
    result dict, or an object with `image_path(id)`; default: `result["path"]`); `query_image` overrides
    `query["query"]` (e.g. an array). Returns `path`."""
    crops = query.get("crops") or []
    load = _loader(thumbs)
    k = max((len(c.get("results") or []) for c in crops), default=0)
    cell_w, cell_h = thumb_size + MARGIN, thumb_size + CAPTION_HEIGHT + MARGIN
    width = max(2 * MARGIN + LABEL_WIDTH + k * cell_w, 480)
    font = _font(12)

    qimg = _query_pil(query, query_image)
    title = f"{query.get('query', '')}  [{query.get('model', '')}]"
    title_h = 20
    if qimg is not None:
        s = min(query_height / qimg.height, (width - 2 * MARGIN) / qimg.width)
        shown = qimg.resize((max(1, round(qimg.width * s)), max(1, round(qimg.height * s))),
                            Image.Resampling.BILINEAR)
        shown = _draw_numbered(shown, [c["box"] for c in crops], None, scale=s)
    else:
        shown = _fit(None, query_height, query_height, "query image missing")
    top = MARGIN + title_h + shown.height + MARGIN
    height = top + len(crops) * cell_h + MARGIN
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(sheet)
    d.text((MARGIN, MARGIN), _short(title, 120), fill=(0, 0, 0), font=font)
    sheet.paste(shown, (MARGIN, MARGIN + title_h))

    for i, c in enumerate(crops):
        y = top + i * cell_h
        d.rectangle([MARGIN, y, MARGIN + 6, y + thumb_size], fill=_colour(i))
        lines = [f"#{i + 1}", _short(c.get("label", ""), 20), f"det {_fmt_score(c.get('score'))}"]
        for j, line in enumerate(lines):
            d.text((MARGIN + 12, y + 2 + 16 * j), line, fill=(0, 0, 0), font=font)
        for j, r in enumerate(c.get("results") or []):
            x = MARGIN + LABEL_WIDTH + j * cell_w
            tile = _fit(_to_pil(load(r), f"result {r.get('id')}"), thumb_size, thumb_size)
            sheet.paste(tile, (x, y))
            d.text((x, y + thumb_size + 2), f"{r.get('rank', j + 1)}. {_fmt_score(r.get('score'))}",
                   fill=(0, 0, 0), font=font)
            d.text((x, y + thumb_size + 15), _short(r.get("id", ""), 20), fill=(60, 60, 60), font=font)
    if Path(path).suffix.lower() not in (".png", ""):
        log.info("render: contact sheet %s is written in the format of its suffix", path)
    return _save(sheet, path)


def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=85) if fmt == "JPEG" else img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_uri(img: Image.Image | None, size: int) -> str:
    if img is not None:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
    return _data_uri(img if img is not None else _fit(None, size, size))


_CSS = """body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin-bottom:20px}
.row{display:flex;align-items:flex-start;gap:8px;margin:8px 0;flex-wrap:wrap}
.crop{width:150px;border-left:8px solid #999;padding-left:6px;font-size:13px}
figure{margin:0;width:SIZEpx;font-size:12px;text-align:center}
figure img{max-width:SIZEpx;max-height:SIZEpx;display:block;margin:auto}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.query img{max-width:100%;max-height:QSIZEpx}"""


def html_report(queries: Sequence[dict], path: str | Path, thumbs: Any = None, *, thumb_size: int = 160,
                query_size: int = 480, title: str = "visearch results") -> Path:
    """One self-contained HTML page (every image embedded as a base64 data URI) for many queries: per query its
    image with numbered boxes, one row per crop with its results, and the merged ranking.

    Image count: per query 1 + sum(len(crop results)) + len(merged). `thumbs` as in `contact_sheet`."""
    load = _loader(thumbs)
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             "<style>" + _CSS.replace("QSIZE", str(query_size)).replace("SIZE", str(thumb_size)) + "</style>",
             "</head><body>", f"<h1>{esc(title)}</h1>"]

    def figure(r: dict) -> str:
        uri = _thumb_uri(_to_pil(load(r), f"result {r.get('id')}"), thumb_size)
        cap = f"{r.get('rank', '')}. {_fmt_score(r.get('score'))}"
        rid = esc(str(r.get("id", "")))
        return (f'<figure><img src="{uri}" alt="{rid}"><figcaption>{esc(cap)}</figcaption>'
                f'<figcaption title="{rid}">{rid}</figcaption></figure>')

    for qi, q in enumerate(queries):
        crops = q.get("crops") or []
        qimg = _query_pil(q, None)
        if qimg is not None:
            s = min(1.0, query_size / max(qimg.width, qimg.height))
            small = qimg.resize((max(1, round(qimg.width * s)), max(1, round(qimg.height * s))),
                                Image.Resampling.BILINEAR)
            qimg = _draw_numbered(small, [c["box"] for c in crops], None, scale=s)
        name = esc(str(q.get("query", "")))
        parts += [f'<section id="q{qi + 1}"><h2>{qi + 1}. {name}</h2>',
                  f"<p>model: {esc(str(q.get('model', '')))}</p>",
                  f'<div class="query"><img src="{_thumb_uri(qimg, query_size)}" alt="query {name}"></div>']
        for i, c in enumerate(crops):
            r, g, b = _colour(i)
            box = ", ".join(f"{float(v):.0f}" for v in c.get("box", []))
            parts.append(f'<div class="row"><div class="crop" style="border-color:rgb({r},{g},{b})">'
                         f"<b>#{i + 1}</b> {esc(str(c.get('label', '')))}<br>det {_fmt_score(c.get('score'))}"
                         f"<br><small>[{box}]</small></div>")
            parts += [figure(res) for res in c.get("results") or []]
            parts.append("</div>")
        merged = q.get("merged") or []
        if merged:
            parts.append('<div class="row"><div class="crop"><b>merged</b><br>best over crops</div>')
            parts += [figure(m) for m in merged]
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path

