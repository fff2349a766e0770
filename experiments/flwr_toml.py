"""Keep ``[tool.flwr.app.config]`` in pyproject.toml equal to the flat Hydra defaults.

Flower only accepts ``--run-config`` keys that exist in that table, so it must list every
key of the schema. ``python -m experiments.flwr_toml`` rewrites the table from ``conf/``;
``tests/test_config.py`` fails when they drift apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = "[tool.flwr.app.config]"


def default_flat_config() -> dict:
    """The flat form of the composed default Hydra config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.config import from_dict, to_flat

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["output_dir=null"])
    return to_flat(from_dict(OmegaConf.to_container(cfg, resolve=True), resolve_model=False))


def render_table(flat: dict) -> str:
    """TOML lines of the table (quoted dotted keys, TOML scalars)."""
    lines = [TABLE]
    for key, value in flat.items():
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f'"{key}" = {text}')
    return "\n".join(lines) + "\n"


def main() -> int:
    """Rewrite the table in pyproject.toml (it must be the file's last section)."""
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    head = text.split(f"\n{TABLE}\n")[0].rstrip() + "\n\n"
    path.write_text(head + render_table(default_flat_config()))
    print(f"updated {TABLE} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
