"""Keep ``[tool.flwr.app.config]`` in pyproject.toml equal to the flat Hydra defaults.

Flower only accepts ``--run-config`` keys that exist in that table, so it must list every
key a run may set: the default run's keys, then every algorithm's own settings block
(``algorithm.<key>.*``) at its defaults, so ``--run-config "algorithm.name='cema'
algorithm.cema.tbr=false"`` works. ``python -m experiments.flwr_toml`` rewrites the table from
``conf/``; ``tests/test_config.py`` fails when they drift apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.algorithms import ALGORITHMS
from experiments.config import from_dict, to_flat

ROOT = Path(__file__).resolve().parents[1]
TABLE = "[tool.flwr.app.config]"


def composed_flat(overrides: list[str]) -> dict:
    """The flat form of the Hydra config composed with ``overrides`` (``model.name=auto`` kept)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["output_dir=null", *overrides])
    return to_flat(from_dict(OmegaConf.to_container(cfg, resolve=True), resolve_model=False))


def default_flat_config() -> dict:
    """The default run's flat config, then every other algorithm's settings block at its defaults."""
    flat = composed_flat([])
    owners = {a.options_key: a.name for a in ALGORITHMS.values() if a.options_key is not None}
    for key, name in sorted(owners.items()):
        block = f"algorithm.{key}."
        if not any(k.startswith(block) for k in flat):
            flat.update({k: v for k, v in composed_flat([f"algorithm={name}"]).items() if k.startswith(block)})
    return flat


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
