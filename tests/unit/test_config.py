"""The typed model-config schema: defaults in one place, unknown keys refused, `extends`, the store identity."""
import numpy as np
import pytest

from visearch.config import load_model_config, model_names
from visearch.config.schema import identity
from visearch.errors import StoreError, UsageError


def test_every_config_resolves_with_every_key():
    for name in model_names():
        cfg = load_model_config(name)
        assert {"family", "name", "describe", "weights", "search", "rerank", "store"} <= set(cfg)
        assert cfg["search"]["top_k"] == 5 and cfg["store"]["dtype"] == "float16"
    assert load_model_config("lite")["describe"]["upscale"] in (True, False)


def test_unknown_keys_are_refused_with_the_known_ones():
    with pytest.raises(UsageError, match=r"rerank\]\.MM") as e:
        load_model_config("superglobal", {"rerank": {"MM": 100}})
    assert "M, K, beta" in e.value.hint
    with pytest.raises(UsageError, match="gem_pp"):
        load_model_config("lite", {"describe": {"gem_pp": 3}})
    with pytest.raises(UsageError, match="reranking"):
        load_model_config("lite", {"reranking": {}})
    with pytest.raises(UsageError, match="unknown reranker"):
        load_model_config("lite", {"rerank": {"name": "ames"}})


def test_extends_states_only_what_differs():
    r50, r101 = load_model_config("superglobal-r50"), load_model_config("superglobal-r101")
    assert r50["weights"] == {"file": "CVPR2022_CVNet_R50.pyth"} and r50["describe"]["depth"] == 50
    r50["weights"], r50["describe"]["depth"], r50["name"] = r101["weights"], 101, r101["name"]
    assert r50 == r101
    dist, flt = load_model_config("ames-dist"), load_model_config("ames-float")
    assert (flt["rerank"]["variant"], flt["rerank"]["checkpoint"], flt["rerank"]["lam"], flt["rerank"]["gamma"]) == \
        ("float", "r101_cvnet_ames.pt", 0.85, 0.80)
    for k in ("variant", "checkpoint", "lam", "gamma"):
        flt["rerank"][k] = dist["rerank"][k]
    flt["name"] = dist["name"]
    assert flt == dist
    assert load_model_config("superglobal")["name"] == "superglobal-r101"


def test_store_identity_ignores_batch_sizes_and_fills_defaults():
    base = identity(load_model_config("superglobal-r50"))
    assert "batch_size" not in base["describe"] and base["describe"]["depth"] == 50
    assert identity(load_model_config("superglobal-r50", {"describe": {"batch_size": 32}})) == base
    assert identity(load_model_config("superglobal-r50", {"describe": {"gem_p": 3.0}})) != base
    # what an older store recorded: the full [describe] with batch_size
    old = {"family": "superglobal", "describe": dict(load_model_config("superglobal-r50")["describe"]),
           "store": {"dtype": "float16"}}
    assert identity(old) == base
    # lite's stores recorded only the keys in lite.toml; the defaults they left out are the schema's
    lite = load_model_config("lite")
    short = {"family": "lite", "describe": {k: lite["describe"][k] for k in ("scales", "gem_p", "max_side")},
             "store": {"dtype": "float16"}}
    assert identity(short) == identity(lite)
    assert "local" in identity(load_model_config("ames-dist")) and "local" not in identity(lite)


def test_old_store_identity_is_accepted_another_config_refused(tmp_path):
    from visearch.models.base import Describer
    from visearch.pipeline.extract import check_store
    from visearch.store import Store

    cfg = load_model_config("superglobal-r50")
    old = {"family": "superglobal", "describe": dict(cfg["describe"]), "store": {"dtype": "float16"}}
    store = Store.create(tmp_path / "s", model="superglobal-r50", config=old, dim=4, weights_sha256="ab",
                         local_fields={}, dtype="float16", dataset="d")

    class D(Describer):
        def extract(self, images):
            return np.zeros((len(images), 4), np.float32)

    check_store(store, D("superglobal-r50", 4, load_model_config("superglobal-r50", {"describe": {"batch_size": 2}}),
                         weights_sha256="ab"))
    with pytest.raises(StoreError, match="another superglobal-r50 configuration"):
        check_store(store, D("superglobal-r50", 4, load_model_config("superglobal-r50", {"describe": {"gem_p": 3.0}}),
                             weights_sha256="ab"))


def test_config_hook_sees_every_load():
    from visearch import config

    seen = []
    config.add_hook(lambda c: seen.append(c["name"]) or c)
    try:
        load_model_config("lite")
        load_model_config("superglobal")
    finally:
        config._HOOKS.pop()
    assert seen == ["lite", "superglobal-r101"]
