"""visearch.bench: statistics, --compare ratios, peak-memory measurement, bench scale on small synthetic sets."""
import copy
import sys

import numpy as np
import pytest

from tests.ties import assert_topk_up_to_ties
from visearch import bench
from visearch.errors import UsageError


def test_stats_ms_median_and_p95_in_milliseconds():
    secs = [0.001 * i for i in range(1, 21)]  # 1..20 ms
    s = bench.stats_ms(secs)
    assert s["median"] == pytest.approx(10.5)
    assert s["p95"] == pytest.approx(19.05)  # linear interpolation: 19 + 0.05 * (20 - 19)
    assert bench.stats_ms([0.25]) == {"median": 250.0, "p95": 250.0}
    with pytest.raises(UsageError):
        bench.stats_ms([])


def test_parse_sizes():
    assert bench.parse_sizes("10k, 100k,1M") == [10_000, 100_000, 1_000_000]
    assert bench.parse_sizes("5000,2.5k,1_000") == [5000, 2500, 1000]
    for bad in ("ten", "0", "", "-5k"):
        with pytest.raises(UsageError):
            bench.parse_sizes(bad)


def _result(load_s=2.0, ips=10.0, total=100.0, ram=500.0, gmap=50.0, cpu="cpu A"):
    return {
        "machine": {"cpu": cpu, "cores_logical": 2, "gpu": None, "device": "cpu", "torch": "2", "cuda": None,
                    "torch_threads": 2},
        "dataset": "demo",
        "models": {
            "lite": {"load_s": load_s, "extract_images_per_s": ips,
                     "query_ms": {s: {"median": total / 2, "p95": total} for s in bench.STAGES},
                     "peak_ram_mb": ram, "peak_gpu_mb": None, "bytes_per_image": {"global": 2560.0, "local": 0.0},
                     "map": {"global": {"easy": gmap, "medium": gmap, "hard": None}, "reranked": None},
                     "mp": None},
            "superglobal": {"skipped": "WeightsError: weights not found"},
        },
    }


def test_compare_ratios_and_direction():
    old = _result()
    new = _result(load_s=1.0, ips=30.0, total=150.0, ram=500.0, gmap=60.0, cpu="cpu B")
    cmp = bench.compare(new, old)
    rows = cmp["models"]["lite"]
    assert rows["load_s"] == {"old": 2.0, "new": 1.0, "ratio": 0.5, "better": True}
    assert rows["extract_images_per_s"]["ratio"] == pytest.approx(3.0) and rows["extract_images_per_s"]["better"]
    assert rows["query_ms.total.p95"]["ratio"] == pytest.approx(1.5) and rows["query_ms.total.p95"]["better"] is False
    assert rows["peak_ram_mb"]["ratio"] == 1.0 and rows["peak_ram_mb"]["better"] is None
    assert rows["map.global.easy"]["ratio"] == pytest.approx(1.2) and rows["map.global.easy"]["better"]
    # old 0 -> no ratio; None figures (no GPU, no hard positives, no reranker) are left out
    assert rows["bytes_per_image.local"]["ratio"] is None
    assert "peak_gpu_mb" not in rows and "map.global.hard" not in rows
    assert "superglobal" not in cmp["models"]  # skipped in both runs
    assert cmp["machine_differs"] == {"cpu": ["cpu A", "cpu B"]}
    # every query stage compared, median and p95
    assert {k for k in rows if k.startswith("query_ms.")} == {f"query_ms.{s}.{q}" for s in bench.STAGES
                                                              for q in ("median", "p95")}


def test_compare_rejects_a_foreign_json():
    with pytest.raises(UsageError):
        bench.compare(_result(), {"hello": 1})


def test_compare_table_renders_and_notes_machine_change():
    from rich.console import Console

    cmp = bench.compare(_result(load_s=1.0, cpu="other"), _result())
    console = Console(width=120, record=True)
    console.print(bench.compare_table(cmp))
    text = console.export_text()
    assert "load_s" in text and "0.500" in text and "better" in text and "machines differ" in text


_PEAK_SCRIPT = """
import numpy as np
from visearch import bench
big = np.ones(150 * 2**20 // 8)  # 150 MB touched before the block
del big
with bench.PeakMemory() as m:
    pass
with bench.PeakMemory() as m2:
    x = np.ones(200 * 2**20 // 8)  # 200 MB touched inside
    x.sum()
    del x
print(m.scope, m.ram_mb - m.start_ram_mb, m2.ram_mb - m2.start_ram_mb, m2.gpu_mb)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_peak_memory_sees_an_allocation_inside_the_block_only():
    # a fresh process: in a long test session freed memory stays resident and a new allocation may not raise RSS
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True).stdout
    scope, before, inside, gpu = out.split()
    assert scope == "block"
    assert float(inside) > 180
    assert float(before) < 100  # the earlier 150 MB peak was reset
    assert gpu == "None"


def test_accuracy_keeps_missing_protocols_as_none():
    res = {p: {"map": 12.345, "mp@1": 100.0, "mp@5": 40.0, "mp@10": 20.0} for p in ("easy", "medium")}
    res["hard"] = {"map": None, "mp@1": None, "mp@5": None, "mp@10": None}
    maps, mps = bench._accuracy({"global": res, "reranked": None})
    assert maps == {"global": {"easy": 12.345, "medium": 12.345, "hard": None}, "reranked": None}
    assert mps["global"]["medium"] == {"mp@1": 100.0, "mp@5": 40.0, "mp@10": 20.0} and mps["reranked"] is None


def test_scale_small_sets_all_backends(tmp_path):
    res = bench.scale(sizes=(600, 3000), dim=32, nq=3, k=10, chunk_rows=512, reps=1, in_memory_max=1000,
                      store_max=1000, tmp_dir=tmp_path, threads=1)
    assert res["settings"]["dim"] == 32 and res["machine"]["torch_threads"] == 1
    small, big = res["sizes"]["600"], res["sizes"]["3000"]
    for r in (small, big):
        assert r["exact_ms"] > 0 and r["exact_ms_per_query"] == pytest.approx(r["exact_ms"] / 3, abs=1e-3)
    assert small["bytes_fp16"] == 600 * 32 * 2
    assert small["data_kind"] == "in RAM" and big["data"].startswith("one 512-row block streamed 6")
    assert small["store_ms"] > 0 and small["store_bytes_per_image"] >= 64  # 64 B of fp16 descriptor per row
    assert big["store_ms"] is None
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert small["faiss_skipped"].startswith("faiss is not installed")
    else:
        assert small["faiss_ms"] > 0 and big["faiss_ms"] > 0
        # FAISS SQfp16 on the same float16 rows finds the same top-k (random rows: no ties)
        assert small["faiss_sq_ms"] > 0 and small["same_top_k_as_faiss_sq"] == 1.0
        assert small["exact_vs_faiss_sq"] == pytest.approx(small["exact_ms"] / small["faiss_sq_ms"], rel=1e-2)
        assert big["faiss_sq_ms"] is None and "not held in memory" in big["faiss_sq_skipped"]
    for r in (small, big):
        assert r["copy_gb_per_s"] > 0 and r["exact_chunks_rescored"] + r["exact_chunks_float32"] >= 1
    assert small["exact_float32_ms"] > 0 and "exact_float32_ms" not in big
    assert list(tmp_path.iterdir()) == []  # temporary stores removed
    limited = bench.scale(sizes=(600,), dim=32, nq=2, k=5, reps=1, faiss_max_gb=1e-6, store_max=0)
    r = limited["sizes"]["600"]
    assert r["faiss_ms"] is None and ("needs" in r.get("faiss_skipped", "") or "not installed" in r["faiss_skipped"])


def test_scale_streamed_blocks_give_the_same_top_k_as_distinct_rows():
    """The >in_memory_max path repeats one block: its top-k must equal the top-k over the materialised rows."""
    from visearch.search import topk_stream

    rng = np.random.default_rng(1)
    block = bench._unit_rows(rng, 64, 16)
    assert block.dtype == np.float16 and np.allclose(np.linalg.norm(block.astype(np.float32), axis=1), 1, atol=1e-2)
    q = bench._unit_rows(rng, 2, 16).astype(np.float32)
    blocks = [(a, block) for a in range(0, 256, 64)]
    rows, sims = topk_stream(q, blocks, 8)
    full = np.concatenate([block] * 4).astype(np.float32)
    scores = q @ full.T
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :8]
    # the repeated rows tie (equal up to the rounding of whichever kernel computed them): scores compare
    # position by position, rows as sets within each tied group
    assert np.allclose(sims, np.take_along_axis(scores, ref, 1), atol=1e-5)
    assert_topk_up_to_ties(rows, ref, np.take_along_axis(scores, ref, 1), 1e-5, -np.sort(-scores, axis=1)[:, 8])


def test_tables_render_a_result_with_a_skipped_model():
    from rich.console import Console

    r = copy.deepcopy(_result())
    r["models"]["lite"].update(projected_1m_gb={"global": 2.56, "local": 0.0},
                               queries={"crops_per_query": 1.0},
                               mp={"global": {p: {k: 50.0 for k in bench.MP_KS} for p in bench.PROTOCOLS},
                                   "reranked": None})
    r["dataset_info"] = {"images": 14, "queries": 12}
    r["settings"] = {"device": "cpu"}
    console = Console(width=160, record=True)
    for t in bench.tables(r):
        console.print(t)
    text = console.export_text()
    assert "bench demo: 14 images" in text and "superglobal skipped: WeightsError" in text
    assert "50.00" in text and "2.56" in text
