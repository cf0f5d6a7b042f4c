"""A query loop in its own process, for the concurrency test: `python query_loop.py DATA DATASET IMAGE STOPFILE`.

Loads the (fast) lite model once, prints {"ready": true, "query": descriptor}, then until STOPFILE exists: opens
the dataset and its store afresh (api.Searcher, as every `visearch query` does) and queries IMAGE for every stored
image, printing one JSON line per answer: {"rows": len(store), "shards": n, "results": [[id, score], ...]}, or
{"error": one-line message} for a StoreError (before the first shard is committed the store does not exist yet).
Any other exception is a crash: it is printed as {"crash": traceback} and the loop exits 1.
"""
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_cli  # puts the repository on sys.path


def main() -> int:
    fast_cli.install()  # before visearch's api and registry are used
    from visearch import api
    from visearch.errors import StoreError
    from visearch.images import load_rgb
    from visearch.registry import load_model

    data, dataset, image, stop = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    describer = load_model("lite", device="cpu")
    q = describer.extract([load_rgb(image)]).global_[0]  # [D], to check every score against the final store
    print(json.dumps({"ready": True, "query": q.tolist()}), flush=True)
    while not stop.exists():
        try:
            s = api.Searcher(dataset, "lite", data, device="cpu", rerank=False, describer=describer)
            res = s.query(image, top_k=1000)
            out = {"rows": len(s.store), "shards": len(s.store.shards),
                   "results": [[r["id"], r["score"]] for r in res["crops"][0]["results"]]}
            s.store.close()
        except StoreError as e:
            out = {"error": e.message}
            time.sleep(0.02)  # nothing to query yet: leave the CPU to the extraction
        except Exception:  # noqa: BLE001  (reported as a crash)
            print(json.dumps({"crash": traceback.format_exc()}), flush=True)
            return 1
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
