"""The real `visearch` CLI with `ames-dinov2` (float) switched to its DINOv2 CLS global stage (`[describe] global =
"cls"`, the documented config option) so that the e2e tests cover both global stages: `ames-dinov2-dist` keeps the
published SuperGlobal shortlist. Run as `python tests/e2e/dinov2_cli.py <visearch arguments>`; everything else is
the real code path. The override is part of the store's provenance like any other configuration."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def install() -> None:
    from visearch import config

    def cls_global(cfg):
        return config.merge(cfg, {"describe": {"global_stage": "cls"}}) if cfg.get("name") == "ames-dinov2" else cfg

    config.add_hook(cls_global)


if __name__ == "__main__":
    install()
    from visearch.cli import main

    sys.argv[0] = "visearch"
    main()
