"""The `visearch` command: a thin Typer layer over visearch.api. Results go to stdout, progress and logs to stderr.

Heavy libraries (torch, h5py, transformers) are imported inside the commands, so `visearch --help` starts fast.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

# plain help formatting: importing rich's markdown stack would double the start-up time of `visearch --help`
os.environ.setdefault("TYPER_USE_RICH", "0")
import typer  # noqa: E402

from .errors import StoreError, UsageError, VisearchError, first_line  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Instance-level visual search: convert, extract, detect, query, eval, bench.")
weights_app = typer.Typer(add_completion=False, no_args_is_help=True, help="List, download and verify model weights.")
app.add_typer(weights_app, name="weights")


class _State:
    data_dir: Optional[Path] = None
    weights_dir: Optional[Path] = None
    quiet: bool = False


state = _State()


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False)  # paths may contain [brackets]


def _workspace(device: str = "auto"):
    """The data dir, weights dir, device and quietness of this run, as the one object the library takes."""
    from .workspace import Workspace

    return Workspace.resolve(state.data_dir, state.weights_dir, device, state.quiet)


def _info(msg: str) -> None:
    if not state.quiet:
        sys.stderr.write(msg + "\n")


QUIET_HELP = "No progress bars or notes on stderr."
VERBOSE_HELP = "Log details to stderr."


def _set_output(quiet: bool, verbose: bool) -> None:
    state.quiet = state.quiet or quiet
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


def _output_flags(func):
    """Let a command also take --quiet/--verbose after its name (`visearch extract shop --quiet`), as before it."""
    sig = inspect.signature(func)
    extra = [inspect.Parameter("late_quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, "--quiet", "-q", help=QUIET_HELP)),
             inspect.Parameter("late_verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP))]

    @functools.wraps(func)
    def wrapper(*args, late_quiet: bool = False, late_verbose: bool = False, **kwargs):
        _set_output(late_quiet, late_verbose)
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    wrapper.__annotations__ = {**func.__annotations__, "late_quiet": "bool", "late_verbose": "bool"}
    return wrapper


@app.callback()
def _main(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="VISEARCH_DATA_DIR",
                                            help="Where datasets and stores live [default: ./data]."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", envvar="VISEARCH_WEIGHTS_DIR",
                                               help="Where weight files live [default: ./weights]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    state.data_dir, state.weights_dir, state.quiet = data_dir, weights_dir, quiet
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- convert --------------------------------------------------------------------------------------------------------
@app.command()
@_output_flags
def convert(
    source: Path = typer.Argument(..., help="Folder of images (recursive), or a revisitop dataset folder."),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name (folder under the data dir)."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="CSV or JSON ground truth for eval."),
    replace: bool = typer.Option(False, "--replace", help="Allow a different source folder for an existing name."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Turn a folder of images into a revisitop-layout dataset (re-run to add new images only)."""
    from . import api

    rep = api.convert(source, name, ground_truth=ground_truth, replace=replace, workspace=_workspace())
    if rep.n_images == 0:
        sys.stderr.write(f"warning: no usable images found in {source}\n")
    if json_out:
        _out(json.dumps(rep.as_dict(), default=str))
        return
    _out(rep.summary())


# ---- extract --------------------------------------------------------------------------------------------------------
@app.command()
@_output_flags
def extract(
    dataset: str = typer.Argument(..., help="Dataset name (see `visearch convert`)."),
    model: str = typer.Option("lite", "--model", "-m", help="Model name (`visearch models`)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A specific checkpoint file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (equal sizes only)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes [default: auto]."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Discard the existing store and describe everything."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (an actor pool on Ray)."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: auto or HOST:PORT of a running cluster "
                                          "[default: a local Ray instance for this run]."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=1, help="ray: model actors "
                                              "[default: one per CPU, or per --num-gpus share of the GPUs]."),
    num_gpus: float = typer.Option(0, "--num-gpus", min=0, help="ray: GPUs per actor (0: actors use the CPU)."),
) -> None:
    """Describe the dataset's images into an HDF5 store (incremental and resumable)."""
    from . import api
    from .registry import load_engine

    if engine == "ray":
        if workers is not None:
            raise UsageError("--workers applies to --engine local", "with --engine ray each actor decodes its own batches")
        eng = load_engine("ray", address=address, num_workers=num_workers, num_gpus=num_gpus, device=device)
        device = "cpu"  # here the model only supplies the store's identity: the actors describe, on eng's device
    else:
        if address is not None or num_workers is not None or num_gpus:
            raise UsageError("--address, --num-workers and --num-gpus apply to --engine ray")
        eng = load_engine(engine, workers=workers)
    r = api.extract(dataset, model, weights=weights, batch_size=batch_size, rebuild=rebuild,
                    workspace=_workspace(device), engine=eng)
    d = {"dataset": r.dataset, "model": r.model, "store": str(r.store), "added": r.added, "updated": r.updated,
         "removed": r.removed, "failed": [{"id": i, "reason": why} for i, why in r.failed], "total": r.total,
         "seconds": round(r.seconds, 3), "images_per_s": round(r.images_per_s, 2)}
    if json_out:
        _out(json.dumps(d))
        return
    _out(f"{r.dataset} [{r.model}]: {r.added} added, {r.updated} updated, {r.removed} removed, "
         f"{len(r.failed)} failed, {r.total} images in dataset ({r.images_per_s:.1f} img/s) -> {r.store}")
    for i, why in r.failed[:20]:
        sys.stderr.write(f"  skipped {i}: {why}\n")
    if r.index is not None:
        _info(f"index updated: {r.index.added} added, {r.index.removed} removed, {r.index.vectors} vectors")


# ---- index ----------------------------------------------------------------------------------------------------------
index_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="A FAISS first-stage index in the store folder (query and eval then use it).")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    dataset: str = typer.Argument(..., help="Dataset name."),
    model: str = typer.Option("lite", "--model", "-m", help="Model whose store is indexed."),
    factory: Optional[str] = typer.Option(None, "--factory", help="FAISS index factory string, e.g. "
                                          "'PCAR256,IVF4096_HNSW32,PQ64' [default: chosen from size and budget]."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 4GB: the rule picks an index "
                                                "whose codes fit."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="Vectors to train on "
                                             "[default: max(39 x lists, 50,000)]."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF lists scanned per query [64]."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Build (or rebuild) the store's FAISS index; `extract` keeps it current afterwards."""
    from . import api

    r = api.build_index(dataset, model, factory=factory, memory_budget=memory_budget, train_size=train_size,
                        nprobe=nprobe, workspace=_workspace())
    d = {"dataset": dataset, "model": model, "factory": r.factory, "vectors": r.vectors, "train_size": r.train_size,
         "seconds": round(r.seconds, 3), "code_bytes_per_vector": r.code_bytes,
         "file_bytes_per_vector": round(r.file_bytes / max(1, r.vectors), 1)}
    if json_out:
        _out(json.dumps(d))
        return
    _out(f"{dataset} [{model}]: {r.factory} over {r.vectors} vectors (trained on {r.train_size}), "
         f"{r.code_bytes:g} B/vector codes, {d['file_bytes_per_vector']} B/vector on disk, {r.seconds:.1f} s")


# ---- query ----------------------------------------------------------------------------------------------------------
def _detector_options(box_threshold, text_threshold, token_file, endpoint, default_prompt=None) -> dict:
    opts = {}
    if default_prompt is not None:
        opts["default_prompt"] = default_prompt
    if box_threshold is not None:
        opts["box_threshold"] = box_threshold
    if text_threshold is not None:
        opts["text_threshold"] = text_threshold
    if token_file is not None or endpoint is not None:
        opts.update(token_file=token_file, endpoint=endpoint)
    return opts


DEFAULT_PROMPT_HELP = ("Phrases always looked for besides --prompt (Grounding DINO) [default: 'main object . key object "
                       ". logo'; '' for the user's prompt only].")


@app.command()
@_output_flags
def query(
    images: List[str] = typer.Argument(..., help="Query images, a .txt list of paths, or - for paths on stdin."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset to search."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model name (`visearch models`) [default: lite-sv when the dataset "
                                             "has a lite-sv store, else lite]."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A specific checkpoint file."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", min=1,
                                        help="Results per crop [default: the model's [search] top_k, 5]."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to look for, e.g. 'clothes . bag'."),
    detector: Optional[str] = typer.Option(None, "--detector",
                                           help="gdino, gdino-cloud, tiles or none [default: none, or auto "
                                                "(gdino if its weights are present, else tiles) with --prompt]."),
    max_boxes: int = typer.Option(5, "--max-boxes", min=0, help="Crops from the detector (plus the whole image)."),
    box_threshold: Optional[float] = typer.Option(None, "--box-threshold"),
    text_threshold: Optional[float] = typer.Option(None, "--text-threshold"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="gdino-cloud API token file."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="gdino-cloud API endpoint."),
    default_prompt: Optional[str] = typer.Option(None, "--default-prompt", help=DEFAULT_PROMPT_HELP),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Global search only."),
    exact: bool = typer.Option(False, "--exact", help="Scan every descriptor even when the store has an index."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per query image."),
    paths: bool = typer.Option(False, "--paths", help="Bare result paths (merged ranking), one per line."),
    show: Optional[Path] = typer.Option(None, "--show", help="Write a PNG contact sheet (one per query)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report."),
) -> None:
    """Search a dataset with one or many query images (each image, and each detected region, is a crop)."""
    from . import api

    if json_out and paths:
        raise UsageError("--json and --paths cannot be combined")
    from .paths import check_writable

    if show is not None:  # checked before any query runs, not after all of them
        check_writable(show, "--show", (".png", ".jpg", ".jpeg", ".webp"))
    if html is not None:
        check_writable(html, "--html")
    stdin_lines = _decode_query_list(sys.stdin.buffer.read(), "stdin").splitlines() if "-" in images else None
    qlist = _read_query_list(images, stdin_lines)
    if model is None:
        model = api.default_query_model(dataset, state.data_dir)
        if model != "lite":
            _info(f"model: {model} (the dataset has its store)")
    if top_k is None:
        from .config import load_model_config

        top_k = int(load_model_config(model)["search"]["top_k"])
    searcher = api.Searcher(dataset, model, weights=weights, workspace=_workspace(device),
                            rerank=not no_rerank, detector=detector, prompt=prompt, exact=exact,
                            detector_options=_detector_options(box_threshold, text_threshold, token_file, endpoint,
                                                               default_prompt))
    if detector is None and searcher.detector_name != "none":  # the library's automatic choice, said once
        _info(f"detector: {searcher.detector_name}")
    results, failures = [], 0
    for q in qlist:
        try:
            res = searcher.query(q, prompt=prompt, top_k=top_k, max_boxes=max_boxes)
        except StoreError:  # the store, not this query image, is at fault: stop with its own message
            raise
        except VisearchError as e:  # one bad query image must not stop a batch
            failures += 1
            sys.stderr.write(f"error: {e}\n" if q in e.message else f"error: {q}: {e}\n")
            continue
        results.append(res)
        if json_out:
            _out(json.dumps(res))
        elif paths:
            for m in res["merged"]:
                _out(m["path"])
        else:
            _print_query_table(res)
    if show or html:
        from . import render

        if show:
            for i, res in enumerate(results):
                out = show if len(results) == 1 else show.with_name(f"{show.stem}-{i + 1}{show.suffix}")
                render.contact_sheet(res, out, searcher.dataset)
                _info(f"wrote {out}")
        if html:
            render.html_report(results, html, searcher.dataset)
            _info(f"wrote {html}")
    if failures:
        raise typer.Exit(1)


def _decode_query_list(data: bytes, where: str) -> str:
    """The text of a list of query paths; UsageError (one line) for binary content (NUL bytes, not UTF-8)."""
    bad = data.find(b"\0")
    try:
        if bad < 0:
            return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
    raise UsageError(f"{where}: not a text list of image paths (binary content at byte {bad})",
                     "a query list holds one image path per line, UTF-8 text")


def _read_query_list(args: List[str], stdin_lines: Optional[List[str]] = None) -> List[str]:
    """Query arguments: image paths, `-` for stdin (one path per line), or a .txt/.lst file of paths."""
    out: List[str] = []
    for a in args:
        if a == "-":
            out += [ln.strip() for ln in (stdin_lines or []) if ln.strip()]
        elif a.lower().endswith((".txt", ".lst")) and Path(a).is_file():
            try:
                data = Path(a).read_bytes()
            except OSError as e:
                raise UsageError(f"cannot read query list {a}: {e.strerror or e}") from None
            out += [ln.strip() for ln in _decode_query_list(data, a).splitlines() if ln.strip()]
        else:
            out.append(a)
    if not out:
        raise UsageError("no query images given", "pass image paths, a .txt list, or - to read paths from stdin")
    return out


def _print_query_table(res: dict) -> None:
    from rich.table import Table

    console = _console()
    for c in res["crops"]:
        box = ", ".join(f"{v:.0f}" for v in c["box"])
        det = f" {c['score']:.2f}" if c["score"] is not None else ""
        t = Table(title=f"{res['query']} | {c['label']}{det} [{box}]", title_justify="left")
        for col in ("rank", "score", "id", "path"):
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for r in c["results"]:
            t.add_row(str(r["rank"]), f"{r['score']:.4f}", r["id"], r["path"])
        console.print(t)
    if len(res["crops"]) > 1:
        t = Table(title=f"{res['query']} | merged (best score per image)", title_justify="left")
        for col in ("rank", "score", "id", "path"):
            t.add_column(col)
        for r in res["merged"]:
            t.add_row(str(r["rank"]), f"{r['score']:.4f}", r["id"], r["path"])
        console.print(t)


# ---- serve / ui -----------------------------------------------------------------------------------------------------
def _serve(dataset, model, host, port, detector, token_file, device, workers, max_pending, max_upload_mb,
           open_browser: bool) -> None:
    from .serve.server import serve as run_server
    from .serve.service import ServeOptions

    if max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    opts = ServeOptions(datasets=dataset, models=model or ["lite"], detectors=detector or [], data_dir=state.data_dir,
                        weights_dir=state.weights_dir, device=device, workers=workers, max_pending=max_pending,
                        max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    run_server(opts, host=host, port=port, token_file=token_file, open_browser=open_browser, quiet=state.quiet)


def _serve_command(open_browser: bool, doc: str):
    """One Typer command for `serve` and `ui` (they differ only in opening the page)."""

    def command(
        dataset: List[str] = typer.Option(..., "--dataset", "-d", help="Dataset to serve (repeat for more)."),
        model: Optional[List[str]] = typer.Option(None, "--model", "-m",
                                                  help="Model to serve (repeat for more) [default: lite]."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback it needs --token-file."),
        port: int = typer.Option(8421, "--port", help="TCP port."),
        detector: Optional[List[str]] = typer.Option(
            None, "--detector", help="Detector to keep loaded (repeat; the first is the default with a prompt) "
                                     "[default: gdino if its weights are present, else tiles]."),
        token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                  help="File holding the bearer token clients must send."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        workers: int = typer.Option(1, "--workers", min=1, help="Queries run at once (1 = one model forward at a time)."),
        max_pending: int = typer.Option(64, "--max-pending", min=1, help="Running + waiting queries before 503 busy."),
        max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest upload in MB (larger: 413)."),
    ) -> None:
        _serve(dataset, model, host, port, detector, token_file, device, workers, max_pending, max_upload_mb,
               open_browser)

    command.__doc__ = doc
    return command


app.command("serve")(_serve_command(False, "Serve the search page and JSON API with models kept in memory (Ctrl-C to "
                                           "stop)."))
app.command("ui")(_serve_command(True, "`serve`, and open the page in a browser when one is available."))


# ---- eval -----------------------------------------------------------------------------------------------------------
@app.command("eval")
@_output_flags
def eval_(
    dataset: str = typer.Argument(..., help="Dataset with ground truth."),
    model: str = typer.Option("lite", "--model", "-m"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A specific checkpoint file."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Evaluate global search only."),
    exact: bool = typer.Option(False, "--exact", help="Scan every descriptor even when the store has an index."),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json", help="One JSON object (percentages)."),
) -> None:
    """Revisitop evaluation: mAP (Easy/Medium/Hard) and mP@1/5/10."""
    from . import api

    r = api.evaluate(dataset, model, weights=weights, rerank=not no_rerank, workspace=_workspace(device), exact=exact)
    main_result = r["reranked"] or r["global"]
    if json_out:
        _out(json.dumps({"dataset": r["dataset"], "model": r["model"], "reranked": r["reranked"] is not None,
                         **main_result}))
        return
    from rich.table import Table

    t = Table(title=f"{r['dataset']} [{r['model']}] revisitop evaluation (%)", title_justify="left")
    t.add_column("protocol")
    cols = [("global", r["global"])] + ([("reranked", r["reranked"])] if r["reranked"] else [])
    for name, _ in cols:
        for m in ("mAP", "mP@1", "mP@5", "mP@10"):
            t.add_column(f"{name} {m}" if len(cols) > 1 else m, justify="right")
    for proto in ("easy", "medium", "hard"):
        row = [proto]
        for _, res in cols:
            # None: no query has positives under this protocol (e.g. no "hard" images in the ground truth)
            vals = res.get(proto) or {}
            row += ["-" if vals.get(k) is None else f"{vals[k]:.2f}" for k in ("map", "mp@1", "mp@5", "mp@10")]
        t.add_row(*row)
    _console().print(t)


# ---- detect ---------------------------------------------------------------------------------------------------------
@app.command()
@_output_flags
def detect(
    image: Path = typer.Argument(..., help="Image to search for regions."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to look for, e.g. 'clothes . bag'."),
    detector: Optional[str] = typer.Option(None, "--detector", help="gdino, gdino-cloud, tiles or none "
                                           "[default: gdino if its weights are present, else tiles]."),
    box_threshold: Optional[float] = typer.Option(None, "--box-threshold"),
    text_threshold: Optional[float] = typer.Option(None, "--text-threshold"),
    max_boxes: Optional[int] = typer.Option(None, "--max-boxes", min=1),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="gdino-cloud API token file."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="gdino-cloud API endpoint."),
    default_prompt: Optional[str] = typer.Option(None, "--default-prompt", help=DEFAULT_PROMPT_HELP),
    json_out: bool = typer.Option(False, "--json"),
    save: Optional[Path] = typer.Option(None, "--save", help="Write the image with the boxes drawn."),
) -> None:
    """Find regions of interest with Grounding DINO (local or cloud) or weight-free tiles."""
    from . import api

    if detector is None:
        detector = api.default_detector(state.weights_dir)
        _info(f"detector: {detector}" + (" (no Grounding DINO weights found)" if detector == "tiles" else ""))
    name, boxes = api.detect(image, prompt, detector, state.weights_dir,
                             **_detector_options(box_threshold, text_threshold, token_file, endpoint, default_prompt))
    boxes = sorted(boxes, key=lambda b: -(b.score or 0))[:max_boxes] if max_boxes else boxes
    if save:
        from . import render

        render.draw_boxes(image, boxes, save)
        _info(f"wrote {save}")
    if json_out:
        _out(json.dumps({"image": str(image), "detector": name,
                         "boxes": [{"box": [round(v, 1) for v in b.as_list()], "score": b.score, "label": b.label}
                                   for b in boxes]}))
        return
    from rich.table import Table

    t = Table(title=f"{image} [{name}]: {len(boxes)} boxes", title_justify="left")
    for col in ("#", "x0", "y0", "x1", "y1", "score", "label"):
        t.add_column(col)
    for i, b in enumerate(boxes, 1):
        t.add_row(str(i), *(f"{v:.0f}" for v in b.as_list()), "" if b.score is None else f"{b.score:.3f}", b.label)
    _console().print(t)


# ---- models and weights ---------------------------------------------------------------------------------------------
@app.command()
@_output_flags
def models() -> None:
    """List the model names."""
    from .config import load_model_config, model_names

    for n in model_names():
        cfg = load_model_config(n)
        alias = f" (alias of {cfg['name']})" if cfg["name"] != n else ""
        _out(f"{n}{alias}")


@weights_app.command("list")
@_output_flags
def weights_list() -> None:
    """Weight files each model needs, whether they are present, and where they come from."""
    from . import weight_files

    wdir = _workspace().weights_dir
    for st in weight_files.status(wdir):
        spec = st.spec
        mark = "present" if st.present else "missing"
        _out(f"{spec.name:22s} {mark:8s} {st.path}  sha256={spec.sha256 or 'unknown'}  "
             f"for: {', '.join(spec.used_by)}  from: {(spec.sources() or ['-'])[0]}")


@weights_app.command("download")
@_output_flags
def weights_download(names: List[str] = typer.Argument(..., help="Items or model names from `weights list`.")) -> None:
    """Download weight files (resumable, size/hash checked, written atomically)."""
    from . import progress, weight_files

    wdir = _workspace().weights_dir
    for n in names:
        for spec in weight_files.items_for(n):
            with progress.task(f"download {spec.name}", spec.size or spec.approx_size, state.quiet, unit="B") as adv:
                last = [0]

                def cb(done, total, last=last, adv=adv):
                    adv(done - last[0])
                    last[0] = done

                path = weight_files.download(spec.name, wdir, progress=cb)
            _out(str(path))


@weights_app.command("verify")
@_output_flags
def weights_verify(all_items: bool = typer.Option(False, "--all", help="Also list missing items.")) -> None:
    """Check sizes, hashes and safe loadability of the weight files present."""
    from . import weight_files

    wdir = _workspace().weights_dir
    results = weight_files.verify(wdir, include_missing=all_items)
    for r in results:
        _out(f"{r.spec.name:22s} {'ok' if r.ok else 'BAD'}  {r.message}")
    if not results:
        _out(f"no weight files in {wdir} (see `visearch weights list`)")
    if any(not r.ok for r in results):
        raise typer.Exit(1)


# ---- bench ----------------------------------------------------------------------------------------------------------
# A sub-app whose callback is the default command: `visearch bench --dataset X` benchmarks models,
# `visearch bench scale` measures search cost against N (the callback then does nothing).
bench_app = typer.Typer(add_completion=False, no_args_is_help=False,
                        help="Benchmark models on a dataset (`bench --dataset NAME`), or search cost (`bench scale`).")
app.add_typer(bench_app, name="bench")


def _write_json_result(obj: dict, dest: Optional[str]) -> None:
    if dest == "-":
        _out(json.dumps(obj, indent=1))
    elif dest:
        Path(dest).write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
        _info(f"wrote {dest}")


@bench_app.callback(invoke_without_command=True)
@_output_flags
def bench(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset to benchmark on (required)."),
    models_: str = typer.Option("lite", "--models", "-m", help="Comma-separated model names."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A specific checkpoint (one model only)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="gdino, gdino-cloud, tiles or none [none]."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Detector prompt for the query runs."),
    max_boxes: int = typer.Option(5, "--max-boxes", min=0, help="Crops from the detector (plus the whole image)."),
    queries: int = typer.Option(20, "--queries", "-n", min=1, help="Timed queries (after the warm-up)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed warm-up queries and extraction batches."),
    sample: int = typer.Option(32, "--sample", min=1, help="Database images for the extraction-speed sample."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (as in extract)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip mAP even when the dataset has ground truth."),
    no_extract: bool = typer.Option(False, "--no-extract",
                                    help="Do not fill a missing or incomplete store (fail instead)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the JSON result to this file (- = stdout)."),
    compare_path: Optional[Path] = typer.Option(None, "--compare", help="Earlier --json result: print ratios."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch [torch default]."),
) -> None:
    """Load time, extraction speed, per-stage query latency, peak memory, bytes per image and mAP, per model."""
    if ctx.invoked_subcommand is not None:
        return
    from . import bench as bench_mod

    if not dataset:
        raise UsageError("bench needs --dataset NAME", "or run `visearch bench scale` for synthetic search cost")
    old = None
    if compare_path is not None:  # checked before the (long) run
        try:
            old = json.loads(compare_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"cannot read {compare_path} as a bench JSON result ({first_line(e, 120)})",
                             "pass a file written by `visearch bench --json FILE`") from None
        bench_mod.check_result(old, str(compare_path))
    if json_path not in (None, "-"):
        from .paths import check_writable

        check_writable(json_path, "--json")
    result = bench_mod.run(dataset, models_.split(","), data_dir=state.data_dir, weights_dir=state.weights_dir,
                           weights=weights, device=device, queries=queries, warmup=warmup, sample=sample,
                           batch_size=batch_size, detector=detector, prompt=prompt, max_boxes=max_boxes,
                           evaluate=not no_eval, extract=not no_extract, threads=threads, quiet=state.quiet)
    cmp = bench_mod.compare(result, old) if old is not None else None
    if cmp is not None:
        result["compare"] = cmp
    if json_path != "-":
        console = _console()
        for t in bench_mod.tables(result):
            console.print(t)
        if cmp is not None:
            console.print(bench_mod.compare_table(cmp))
    _write_json_result(result, json_path)


@bench_app.command("scale")
@_output_flags
def bench_scale(
    sizes: str = typer.Option("10k,100k,1M", "--sizes", help="Numbers of stored descriptors, e.g. 10k,100k,1M."),
    dim: int = typer.Option(2048, "--dim", min=1, help="Descriptor dimension (float16)."),
    queries: int = typer.Option(6, "--queries", min=1, help="Query crops searched together (one query's crops)."),
    top_k: int = typer.Option(100, "--top-k", "-k", min=1, help="Shortlist length."),
    reps: int = typer.Option(3, "--reps", min=1, help="Timed repetitions per size (median reported)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    faiss: bool = typer.Option(True, "--faiss/--no-faiss", help="Compare with FAISS IndexFlatIP when installed."),
    faiss_max_gb: float = typer.Option(2.0, "--faiss-max-gb", help="Largest float32 FAISS index to build."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch and FAISS."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the JSON result to this file (- = stdout)."),
    index: Optional[str] = typer.Option(None, "--index", help="A FAISS factory string: recall@k against exact, "
                                        "ms/query, bytes/vector, build time on clustered rows (first --sizes)."),
    candidates: int = typer.Option(1000, "--candidates", min=1, help="With --index: shortlist rescored exactly."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="With --index: IVF lists scanned."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="With --index: training vectors."),
) -> None:
    """Exact top-k search time against collection size on synthetic descriptors (and FAISS flat if installed)."""
    from . import bench as bench_mod

    if index:
        n = bench_mod.parse_sizes(sizes)[0]
        res = bench_mod.scale_index(index, n=n, dim=dim, k=top_k, candidates=candidates, nprobe=nprobe,
                                    train_size=train_size, reps=reps, threads=threads)
        if json_path != "-":
            s = res["settings"]
            rk, rk1 = res[f"recall@{s['k']}"], res[f"recall@{s['k']}_first_stage_only"]
            _out(f"{s['factory']} over {s['n']:,} x {s['dim']} clustered rows: recall@{s['k']} "
                 f"{rk:.3f} ({s['candidates']} candidates rescored exactly; first stage "
                 f"alone {rk1:.3f}), {res['ms_per_query']:.1f} ms/query "
                 f"(exact scan {res['exact_ms_per_query']:.1f}), {res['code_bytes_per_vector']:g} B/vector codes "
                 f"({res['file_bytes_per_vector']:g} on disk), trained in {res['train_s']:.0f} s, built in "
                 f"{res['build_s']:.0f} s")
        _write_json_result(res, json_path)
        return
    res = bench_mod.scale(bench_mod.parse_sizes(sizes), dim=dim, nq=queries, k=top_k, reps=reps, device=device,
                          faiss=faiss, faiss_max_gb=faiss_max_gb, threads=threads)
    if json_path != "-":
        _console().print(bench_mod.scale_table(res))
    _write_json_result(res, json_path)


def main() -> None:
    """Entry point: map library errors to one-line messages and exit codes, never a traceback."""
    import signal

    interrupted: list[int] = []

    def on_sigint(signum, frame):  # Typer turns KeyboardInterrupt into a silent exit 130: remember that it was one
        interrupted.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, on_sigint)
    try:
        app()
    except SystemExit as e:
        if interrupted:
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        raise e
    except VisearchError as e:
        sys.stderr.write(f"error: {e.message}" + (f" ({e.hint})" if e.hint else "") + "\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # e.g. `visearch query ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:  # an unexpected bug: still one line, with a way to see more
        if os.environ.get("VISEARCH_DEBUG"):
            raise
        sys.stderr.write(f"error: unexpected {type(e).__name__}: {first_line(e, 300)} "
                         "(set VISEARCH_DEBUG=1 for a traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
