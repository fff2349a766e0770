"""The multi-application comparison's accuracy estimates from measured domains (seed 003, III-C1, eq. 5-7).

The accuracy estimator (:class:`models.elastic.estimator.AccuracyEstimator`; inputs: remodel
ratio, distance of mean penultimate features to the source's, and the domain representation) is
fitted on the first domains of the device's sequence (:data:`TRAIN_DOMAIN_SHARE`); on the other
domains its predictions are calibrated with eq. 5-7 against past domains (the training domains
and the app's earlier domains, each monitored at every size: a simplification, a real device
only monitors the size it ran).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.claims.elastic_measure import Measurements
from models.elastic.estimator import (
    FIT_EPOCHS,
    AccuracyEstimator,
    calibrate,
    domain_distance,
    domain_representation,
    estimator_inputs,
)

#: Share of the domains the estimator is fitted on (the first ones of the device's order).
TRAIN_DOMAIN_SHARE = 0.5


def split_domains(count: int, train_share: float = TRAIN_DOMAIN_SHARE) -> tuple[list[int], list[int]]:
    """Indices of the estimator's training domains (the first ``floor(share * count)``) and the rest."""
    cut = int(np.floor(train_share * count))
    if not 1 <= cut < count:
        raise ValueError(f"{count} domains with train_share={train_share} leave no training or no test domain; "
                         "need at least 2 domains and a share that splits them")
    return list(range(cut)), list(range(cut, count))


def domain_inputs(meas: Measurements, domain: int) -> np.ndarray:
    """Estimator rows (C, 2 + 2d) of one domain: [s, dis to source, source mean ++ target mean]."""
    target = meas.target_means[domain]
    representation = domain_representation(meas.source_mean[None, :], target[None, :])
    return estimator_inputs(meas.sizes, domain_distance(meas.source_mean, target), representation)


def fit_estimator(meas: Measurements, train: Sequence[int], seed: int, epochs: int = FIT_EPOCHS) -> AccuracyEstimator:
    """The accuracy estimator fitted on the measured (A, Ã) of the training domains (III-C1).

    ``epochs`` of full-batch Adam (default :data:`models.elastic.estimator.FIT_EPOCHS`).
    """
    inputs = np.vstack([domain_inputs(meas, d) for d in train])
    targets = np.vstack([np.column_stack([meas.before[d], meas.after[d]]) for d in train])
    return AccuracyEstimator(inputs.shape[1]).fit(inputs, targets, epochs=epochs, seed=seed)


def estimate(estimator: AccuracyEstimator, meas: Measurements, domain: int,
             past: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Estimated (A, Ã) at every size of ``domain``, calibrated with the ``past`` domains (eq. 5-7)."""
    predicted = estimator.predict(domain_inputs(meas, domain))
    past = list(past)
    distances = [domain_distance(meas.target_means[domain], meas.target_means[a]) for a in past]
    return calibrate(predicted[:, 0], predicted[:, 1], distances, meas.before[past], meas.after[past])


def estimator_errors(estimator: AccuracyEstimator, meas: Measurements, train: Sequence[int],
                     test: Sequence[int]) -> dict[str, float]:
    """Mean absolute error (accuracy points in [0, 1]) on the test domains, raw and calibrated with ``train``."""
    raw, calibrated = [], []
    for d in test:
        predicted = estimator.predict(domain_inputs(meas, d))
        truth = np.column_stack([meas.before[d], meas.after[d]])
        raw.append(np.abs(predicted - truth))
        calibrated.append(np.abs(np.column_stack(estimate(estimator, meas, d, train)) - truth))
    raw_mae, cal_mae = np.mean(raw, axis=(0, 1)), np.mean(calibrated, axis=(0, 1))
    return {"before_raw": float(raw_mae[0]), "after_raw": float(raw_mae[1]),
            "before_calibrated": float(cal_mae[0]), "after_calibrated": float(cal_mae[1])}
