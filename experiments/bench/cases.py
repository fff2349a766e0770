"""The benchmark's cases: which runs ``python -m experiments.bench`` makes, on which fleets.

A case is a runner (the project's door, the plain-Flower app or the plain loop) on Hydra
overrides; :func:`plan_cases` expands the chosen groups over the fleet sizes of
:func:`parse_sizes`. Measuring them is :mod:`experiments.bench.cli`'s job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

#: Fleets of 100, 500 and 1,000 devices with cohorts of 10, 25 and 50.
ISSUE_COHORTS = {100: 10, 500: 25, 1000: 50}
GROUPS = ("fedavg", "plain", "floor", "stack", "eclm", "cema", "elasticdnn", "fleet", "pump", "ray")
#: The ``pump`` group: the project's FedAvg with Flower's own message pump and polls, the
#: lever ``engine.fast_pump`` undone (experiments/engine/fastpath.py).
FLOWER_PUMP = ("algorithm=fedavg", "engine.fast_pump=false")
#: The ``ray`` group: the project's FedAvg on Flower's Ray backend, the lever
#: ``engine.backend=processes`` (the default ``auto`` on one machine) undone.
ON_RAY = ("algorithm=fedavg", "engine.backend=ray")


@dataclass(frozen=True)
class Case:
    """One thing to measure: a runner (project | plain | floor | stack) on a configuration.

    ``overrides`` are Hydra overrides on top of ``conf/``, the same for every runner, so
    the project's door and the baselines read one configuration.
    """

    name: str
    runner: str
    devices: int
    per_round: int
    overrides: tuple[str, ...]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"100,500,1000"`` or ``"6:3,40:4"`` -> [(devices, cohort), ...]; the first is the default size.

    A bare number takes its cohort from :data:`ISSUE_COHORTS`.

    Raises
    ------
    ValueError
        On an empty list, a malformed item, a cohort outside [1, devices], or a bare number
        with no cohort in the issue's table.
    """
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        devices_text, _, cohort_text = item.partition(":")
        if not devices_text.isdigit() or (cohort_text and not cohort_text.isdigit()):
            raise ValueError(f"size {item!r} is not N or N:K (devices:cohort), e.g. 100 or 40:4")
        devices = int(devices_text)
        if not cohort_text and devices not in ISSUE_COHORTS:
            raise ValueError(f"size {devices} has no default cohort; write it as {devices}:K")
        cohort = int(cohort_text) if cohort_text else ISSUE_COHORTS[devices]
        if not 1 <= cohort <= devices:
            raise ValueError(f"cohort {cohort} of size {item!r} must be in [1, {devices}]")
        sizes.append((devices, cohort))
    return sizes


def _fleet(devices: int, per_round: int) -> tuple[str, ...]:
    return (f"fleet.devices={devices}", f"fleet.per_round={per_round}")


def plan_cases(
    sizes: Sequence[tuple[int, int]], groups: Sequence[str], base: Sequence[str], eclm_model: Sequence[str] = ()
) -> list[Case]:
    """The cases of the chosen ``groups`` (see :data:`GROUPS`), default size first.

    ``base`` overrides go into every case; ``eclm_model`` are the overrides that give FedAvg
    ECLM's network (from :func:`model_overrides`).

    Raises
    ------
    ValueError
        On an unknown group or no sizes.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not sizes:
        raise ValueError(f"unknown case group(s) {unknown} or no sizes; choose from {list(GROUPS)}")
    (devices, cohort), base = sizes[0], tuple(base)
    fleet = _fleet(devices, cohort)
    specs = {
        "fedavg": [("fedavg", "project", ("algorithm=fedavg",))],
        "plain": [("plain", "plain", ("algorithm=fedavg",))],
        "floor": [("floor", "floor", ("algorithm=fedavg",))],
        "stack": [("stack", "stack", ("algorithm=fedavg",))],
        "eclm": [
            ("eclm", "project", ("algorithm=eclm",)),
            ("fedavg_eclm_network", "project", ("algorithm=fedavg", *eclm_model)),
        ],
        "cema": [("cema", "project", ("algorithm=cema", "scenario=online"))],
        "elasticdnn": [("elasticdnn", "project", ("algorithm=elasticdnn", "scenario=evolving"))],
        "pump": [("fedavg_flower_pump", "project", FLOWER_PUMP)],
        "ray": [("fedavg_ray", "project", ON_RAY)],
    }
    cases = [
        Case(f"{label}@{devices}", runner, devices, cohort, (*base, *extra, *fleet))
        for group in GROUPS
        if group in groups and group != "fleet"
        for label, runner, extra in specs[group]
    ]
    if "fleet" in groups:
        cases += [
            Case(f"fedavg@{n}", "project", n, k, (*base, "algorithm=fedavg", *_fleet(n, k)))
            for n, k in sizes
            if not (n == devices and "fedavg" in groups)
        ]
        n, k = max(sizes)
        for group, label, extra in (("pump", "fedavg_flower_pump", FLOWER_PUMP), ("ray", "fedavg_ray", ON_RAY)):
            if group in groups and n != devices:  # both levers' effect grows with the fleet: also the largest
                cases.append(Case(f"{label}@{n}", "project", n, k, (*base, *extra, *_fleet(n, k))))
    return cases


def model_overrides(model) -> tuple[str, ...]:
    """Hydra overrides that reproduce a :class:`ModelConfig` exactly (None -> null; ``++`` adds
    the keys the selected ``model`` group file leaves out)."""
    values = dataclasses.asdict(model)
    return tuple(f"++model.{key}={'null' if value is None else value}" for key, value in values.items())
