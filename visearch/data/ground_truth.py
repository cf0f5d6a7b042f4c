"""Ground truth for a user's own photos (CSV or JSON, by file path) turned into a spec by image id.

Paths are relative to the source folder, or absolute paths inside it; a bare file name is enough when it is unique:

    JSON: {"queries": [{"image": "queries/bridge.jpg", "bbox": [12, 30, 200, 180],
                        "positives": ["db/bridge_1.jpg", "db/bridge_2.jpg"],
                        "hard": ["db/bridge_night.jpg"], "junk": ["db/bridge_blurry.jpg"]}]}
          (a bare list of query objects is accepted too; "easy" is an alias of "positives")
    CSV:  header row, one row per query; lists separated by ";"; empty x1..y2 = whole image;
          the hard and junk columns may be left out:
              query,x1,y1,x2,y2,positives,hard,junk
              queries/bridge.jpg,12,30,200,180,db/bridge_1.jpg;db/bridge_2.jpg,db/bridge_night.jpg,db/bridge_blurry.jpg

    bbox is [x1, y1, x2, y2] in pixels of the upright (EXIF-rotated) query image. "positives" are revisitop's "easy"
    images, "hard" its hard ones (positives in the Medium and Hard protocols), "junk" images are ignored when scoring.
    Query images are taken out of the database (revisitop convention); other images become the database.

A spec is [{"query": id, "bbox": [..] or None, "easy"/"hard"/"junk": [ids]}]; convert.py turns it into gnd indices.
"""
from __future__ import annotations

import csv
import io
import json
import math
import unicodedata
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .dataset import Source


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Parse the CSV or JSON ground-truth file into [{"image", "bbox" or None, "easy", "hard", "junk"}]."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DatasetError(f"cannot read ground truth {path} ({e.strerror or e})", "check the path") from None
    except UnicodeDecodeError:
        raise DatasetError(f"ground truth {path} is not UTF-8 text", "save it as UTF-8 CSV or JSON") from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DatasetError(f"ground truth {path} is not valid JSON ({e})", "see the format in README") from None
        items = obj.get("queries") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DatasetError(f"ground truth {path}: expected {{\"queries\": [...]}} or a list", "see README")
        for k, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("image") or it.get("query"), str):
                raise DatasetError(f"ground truth {path}: query #{k + 1} has no \"image\" path", "see README")
            where = f"query #{k + 1}"

            def paths(key: str, it=it, where=where) -> list[str]:
                v = it.get(key, [])
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise DatasetError(f"ground truth {path} {where}: \"{key}\" must be a list of image paths, "
                                       f"got {json.dumps(v)[:60]}", f'e.g. "{key}": ["db/photo_1.jpg"]')
                return v

            rows.append({"image": it.get("image") or it.get("query"), "bbox": it.get("bbox", it.get("bbx")),
                         "easy": paths("positives") + paths("easy"), "hard": paths("hard"), "junk": paths("junk"),
                         "where": where})
        return rows
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "query" not in fields or "positives" not in fields:
        raise DatasetError(f"ground truth {path}: CSV header must have query and positives columns "
                           f"(got {', '.join(fields) or 'none'})", "header: query,x1,y1,x2,y2,positives,hard,junk")
    for line, raw in enumerate(reader, start=2):
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not r.get("query"):
            continue
        coords = [r.get(c, "") for c in ("x1", "y1", "x2", "y2")]
        if any(coords):
            try:
                bbox = [float(c) for c in coords]
            except ValueError:
                raise DatasetError(f"ground truth {path} line {line}: bad box {coords}", "x1,y1,x2,y2 are numbers") \
                    from None
        else:
            bbox = None

        def split(s: str) -> list[str]:
            return [p.strip() for p in s.split(";") if p.strip()]

        rows.append({"image": r["query"], "bbox": bbox, "easy": split(r.get("positives", "")),
                     "hard": split(r.get("hard", "")), "junk": split(r.get("junk", "")), "where": f"line {line}"})
    return rows


def _bbox(row: dict[str, Any], path: Path) -> list[float] | None:
    """A row's box as four finite floats (None: whole image); DatasetError (one line) otherwise."""
    if row["bbox"] is None:
        return None
    try:
        bbox = [float(v) for v in row["bbox"]] if isinstance(row["bbox"], (list, tuple)) else []
    except (TypeError, ValueError, OverflowError):
        bbox = []
    if len(bbox) != 4 or not all(math.isfinite(v) and abs(v) < 1e9 for v in bbox):
        raise DatasetError(f"ground truth {path} {row['where']}: bbox {str(row['bbox'])[:80]} is not "
                           "[x1, y1, x2, y2] (four finite pixel coordinates)", "see the format in README")
    return bbox


def precheck(path: Path) -> None:
    """Everything about a ground-truth file that does not need the converted images (syntax, types, boxes), so
    `convert` refuses a bad file before it re-encodes any image."""
    if not path.is_file():
        raise DatasetError(f"ground truth file {path} not found", "check the --ground-truth path")
    for row in read_rows(path):
        _bbox(row, path)


def parse(path: Path, src: Path, info: dict[str, Source], skipped_rels: set[str],
          warnings: list[str]) -> list[dict[str, Any]]:
    """Ground-truth file -> spec by ids: [{"query": id, "bbox": [..] or None, "easy"/"hard"/"junk": [ids]}]."""
    if not path.is_file():
        raise DatasetError(f"ground truth file {path} not found", "check the --ground-truth path")
    rows = read_rows(path)
    by_rel = {s.rel: iid for iid, s in info.items() if s.rel}
    by_name: dict[str, list[str]] = {}
    for rel, iid in by_rel.items():
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(iid)
    skipped_names = {r.rsplit("/", 1)[-1] for r in skipped_rels if r}

    def lookup(p: str, where: str) -> str | None:
        """id of a ground-truth path, None for a skipped (bad) image; DatasetError when unknown."""
        q = p.replace("\\", "/")
        cand = Path(q)
        if cand.is_absolute():
            try:
                q = cand.resolve().relative_to(src).as_posix()
            except ValueError:
                raise DatasetError(f"ground truth {path} {where}: {p} is outside the source folder {src}",
                                   "put query and database images inside the folder being converted") from None
        q = q.removeprefix("./")
        q = unicodedata.normalize("NFC", q)
        if q in by_rel:
            return by_rel[q]
        if q in skipped_rels or ("/" not in q and q in skipped_names):
            return None
        if "/" not in q and len(by_name.get(q, [])) == 1:
            return by_name[q][0]
        if "/" not in q and len(by_name.get(q, [])) > 1:
            raise DatasetError(f"ground truth {path} {where}: file name {p} is ambiguous "
                               f"({len(by_name[q])} files)", "give the path relative to the source folder")
        raise DatasetError(f"ground truth {path} {where}: image {p} is not in {src}",
                           "paths are relative to the source folder")

    spec: list[dict[str, Any]] = []
    for row in rows:
        qid = lookup(str(row["image"]), row["where"])
        if qid is None:
            warnings.append(f"ground truth {row['where']}: query {row['image']} was skipped (bad image); "
                                   "query dropped")
            continue
        entry: dict[str, Any] = {"query": qid, "bbox": _bbox(row, path)}
        for k in ("easy", "hard", "junk"):
            ids = []
            for p in row[k]:
                iid = lookup(str(p), row["where"])
                if iid is None:
                    warnings.append(f"ground truth {row['where']}: {p} was skipped (bad image); left out")
                elif iid != qid:
                    ids.append(iid)
            entry[k] = sorted(set(ids))
        spec.append(entry)
    qset = {e["query"] for e in spec}
    for e in spec:
        for k in ("easy", "hard"):
            clash = [i for i in e[k] if i in qset]
            if clash:
                raise DatasetError(f"ground truth {path}: query image {info[clash[0]].rel} is also listed as a "
                                   f"positive of {info[e['query']].rel}",
                                   "query images are not part of the database (revisitop); use another copy")
        e["junk"] = [i for i in e["junk"] if i not in qset]
    if len(qset) != len(spec):
        raise DatasetError(f"ground truth {path}: a query image is listed twice", "one entry per query image")
    return spec


def reapply(spec: list[dict[str, Any]] | None, info: dict[str, Source], warnings: list[str]) -> list[dict[str, Any]]:
    """Stored ground truth restricted to the images that still exist."""
    out = []
    for e in spec or []:
        if e["query"] not in info:
            warnings.append(f"ground-truth query {e['query']} no longer exists; query dropped")
            continue
        out.append({"query": e["query"], "bbox": e.get("bbox"),
                    **{k: [i for i in e.get(k, []) if i in info] for k in ("easy", "hard", "junk")}})
    return out
