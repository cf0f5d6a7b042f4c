"""The wheel carries what the code reads through importlib.resources (model configs, the weights manifest), so a
non-editable install can load models. The full install-from-wheel smoke test runs in .ci/run."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_model_configs_and_weights_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "visearch", src / "visearch", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = (tmp_path / "dist").glob("visearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(f.name for f in (ROOT / "visearch" / "config" / "models").glob("*.toml"))
    assert len(configs) >= 7
    for name in configs:
        assert f"visearch/config/models/{name}" in names
    assert "visearch/weights_manifest.toml" in names
    for name in ("index.html", "app.js", "style.css"):  # the page of `visearch serve`
        assert f"visearch/serve/static/{name}" in names


def test_configs_and_manifest_are_read_from_the_package(monkeypatch, tmp_path):
    """Nothing is looked up relative to the current directory or the source checkout's root."""
    from visearch import config, weight_files

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(weight_files.MANIFEST_ENV, raising=False)
    assert {"lite", "superglobal-r101", "ames-dist"} <= set(config.model_names())
    assert config.load_model_config("superglobal")["name"] == "superglobal-r101"
    assert {s.name for s in weight_files.manifest()} >= {"superglobal-r101", "ames-detector"}
    assert str(config.models_dir()).startswith(str(Path(config.__file__).parent))
