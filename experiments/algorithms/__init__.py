"""The algorithms a run can name: the registry of every plug-in module of this package.

Each module of the package except :mod:`~experiments.algorithms.plugin` is a plug-in: it lists
the :class:`~experiments.algorithms.plugin.Algorithm` objects it offers in a module constant
``ALGORITHMS``. The registry imports every such module once, so adding an algorithm adds a
module here and changes nothing else in ``experiments/`` (README, "Adding an algorithm").
"""

from __future__ import annotations

import importlib
import pkgutil

from experiments.algorithms.plugin import Algorithm
from experiments.schema import ConfigError

#: Modules of this package that are not plug-ins.
NOT_PLUGINS = frozenset({"plugin"})


def _discover() -> dict[str, Algorithm]:
    """Every plug-in's algorithms by name; a name offered twice is an error."""
    found: dict[str, Algorithm] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in NOT_PLUGINS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for algorithm in getattr(module, "ALGORITHMS", ()):
            if algorithm.name in found:
                raise RuntimeError(f"algorithm {algorithm.name!r} is offered twice (again by {module.__name__})")
            found[algorithm.name] = algorithm
    return found


#: Every algorithm by name.
ALGORITHMS: dict[str, Algorithm] = _discover()


def algorithm_named(name: str) -> Algorithm:
    """The algorithm ``name``; ConfigError listing the choices when there is none."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm.name {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def option_keys() -> frozenset[str]:
    """The configuration blocks of every algorithm's own settings (``algorithm.<key>``)."""
    return frozenset(a.options_key for a in ALGORITHMS.values() if a.options_key is not None)
