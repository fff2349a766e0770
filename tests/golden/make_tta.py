"""Write the golden fixtures of the on-device TTA baselines by running each official implementation.

``python -m tests.golden.make_tta <reference> --reference <checkout> --commit <40-hex>``

``<reference>`` and what it writes (each writer's module docstring has the details):

``tent``  (DequanWang/tent, :mod:`tests.golden.make_tta_tent`)
    ``tent_cifar``, ``tent_imagenet``, ``bn_adapt_batch``.
``eata``  (mr-eggplant/EATA, :mod:`tests.golden.make_tta_eata`)
    ``eta_cifar``, ``eta_imagenet``.
``cotta`` (qinenergy/cotta, :mod:`tests.golden.make_tta_cotta`)
    ``cotta_augment``, ``cotta_cifar_confident``, ``cotta_cifar_augment``, ``cotta_imagenet_confident``.
``lame``  (fiveai/LAME, :mod:`tests.golden.make_tta_lame`)
    ``lame_knn``, ``lame_rbf``, ``lame_linear``.
``tta``   (mariodoebler/test-time-adaptation, :mod:`tests.golden.make_tta_bench`)
    ``onda_two_pass``.
``cema``  (chenyaofo/CEMA's baselines, :mod:`tests.golden.make_tta_cema`)
    ``bn_adapt_mixed``, ``onda_layerwise``, ``pl_cema``, ``lame_hook``. The baselines were removed
    from the repository's tree after the commit that published them, so ``--reference`` is a
    *git directory* of the repository and ``--commit`` that commit (9a6ef17...).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from tests.golden import (
    make_tta_bench,
    make_tta_cema,
    make_tta_cotta,
    make_tta_eata,
    make_tta_lame,
    make_tta_tent,
)

WRITERS = {
    "tent": make_tta_tent.write,
    "eata": make_tta_eata.write,
    "cotta": make_tta_cotta.write,
    "lame": make_tta_lame.write,
    "tta": make_tta_bench.write,
    "cema": make_tta_cema.write,
}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen reference's writer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(WRITERS), help="the reference implementation")
    parser.add_argument("--reference", required=True, type=Path, help="its checkout (cema: its git directory)")
    parser.add_argument("--commit", required=True, help="the checkout's 40-hex commit")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise SystemExit(f"--commit must be the 40-hex commit of the checkout, got {args.commit!r}")
    torch.set_num_threads(1)
    produced_by = " ".join(["python -m tests.golden.make_tta", *(argv if argv is not None else sys.argv[1:])])
    for path in WRITERS[args.which](args.reference, args.commit, produced_by):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
