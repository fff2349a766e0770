"""``python -m experiments.bench``: run the benchmark (:mod:`experiments.bench.cli`)."""

from experiments.bench.cli import main

main()
