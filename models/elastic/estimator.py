"""ElasticDNN accuracy estimator for evolving domains (seed 003, section III-C1, eq. 5-7).

For the j-th model size of an application in target domain k, a tiny fully connected net maps

    I = [remodel ratio s_ij, domain distance dis_{0,k}, domain representation]
      -> O = (A_ij^(k) before retraining, Ã_ij^(k) after retraining),

where the domain representation is "the mean feature vectors of source and target domain"
(concatenated here). The prediction is then calibrated with the accuracies monitored in the
past k-1 target domains, weighted by softmax(1 / dis_{k,a}) (eq. 5-7).

The paper does not name the distance; :func:`domain_distance` uses the Euclidean distance
between mean feature vectors by default (a first-moment version of the "mean feature
discrepancy" the feature-alignment literature uses), ``metric="cosine"`` gives 1 - cos.

Plain numpy + torch: nothing of Flower or the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

#: Distances :func:`domain_distance` knows (the paper leaves the choice open, section III-C1).
DISTANCE_METRICS = ("euclidean", "cosine")

#: Weight of the fresh prediction in eq. 6-7 (the past-domain average gets 1 - this): 1/2 in the paper.
CALIBRATION_MIX = 0.5

#: dis_{k,a} is clamped to at least this before 1/dis in eq. 5. A past domain identical to the
#: current one (dis = 0) then takes (numerically) all of the softmax weight, the limit of eq. 5 as
#: dis -> 0. Assumption: the paper does not treat dis = 0.
MIN_DOMAIN_DISTANCE = 1e-6

#: Hidden widths of the "tiny fully connected network" (section III-C1 gives no size; assumption).
HIDDEN_SIZES = (32, 32)

#: Offline fitting: full-batch Adam on the mean squared error (assumptions, the paper is silent).
FIT_EPOCHS = 500
FIT_LR = 1e-2

#: Number of estimator outputs: (A before retraining, Ã after retraining).
N_OUTPUTS = 2


def mean_features(features: np.ndarray) -> np.ndarray:
    """Mean feature vector of a domain: the average over samples of an (m, d) feature matrix."""
    array = np.asarray(features, dtype=float)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"features must be a non-empty (samples, dim) matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("features contain NaN or inf; clean the feature extractor's output first")
    return array.mean(axis=0)


def domain_representation(source_features: np.ndarray, target_features: np.ndarray) -> np.ndarray:
    """The domain representation of section III-C1: source and target mean feature vectors.

    Parameters
    ----------
    source_features, target_features : np.ndarray
        (m_s, d) and (m_t, d) feature matrices (e.g. the backbone's pooled features).

    Returns
    -------
    np.ndarray
        (2 d,) the source mean followed by the target mean.
    """
    source, target = mean_features(source_features), mean_features(target_features)
    if source.shape != target.shape:
        raise ValueError(f"source features have dim {source.shape[0]} but target features have dim "
                         f"{target.shape[0]}; extract both with the same backbone")
    return np.concatenate([source, target])


def domain_distance(feat_a_mean: np.ndarray, feat_b_mean: np.ndarray, metric: str = "euclidean") -> float:
    """Distance between two domains given their mean feature vectors (dis_{0,k}, dis_{k,a}).

    Parameters
    ----------
    feat_a_mean, feat_b_mean : np.ndarray
        (d,) mean feature vectors (:func:`mean_features`).
    metric : {"euclidean", "cosine"}
        ``"euclidean"`` (default): ||a - b||_2. ``"cosine"``: 1 - cos(a, b), in [0, 2]. The paper
        names no metric (section III-C1); Euclidean is our choice. Note that eq. 5 is not scale
        free: softmax(1/dis) is near uniform when all distances are large and near one-hot when
        they are small, so the metric's scale matters.

    Returns
    -------
    float
        A distance >= 0; 0 for identical means.
    """
    a, b = np.asarray(feat_a_mean, dtype=float), np.asarray(feat_b_mean, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two mean vectors of the same length, got shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("mean feature vectors contain NaN or inf")
    if metric == "euclidean":
        return float(np.linalg.norm(a - b))
    if metric == "cosine":
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        if norms == 0:
            raise ValueError("cosine distance is undefined for a zero mean vector; use metric='euclidean'")
        return float(max(0.0, 1.0 - a @ b / norms))
    raise ValueError(f"unknown metric {metric!r}; choose one of {DISTANCE_METRICS}")


def estimator_inputs(remodel_ratios: Sequence[float], distance: float, representation: np.ndarray) -> np.ndarray:
    """The estimator's input rows I = [s_j, dis_{0,k}, representation] for each model size j.

    Returns
    -------
    np.ndarray
        (C, 2 + len(representation)) one row per remodel ratio.
    """
    ratios = np.asarray(remodel_ratios, dtype=float).reshape(-1)
    rep = np.asarray(representation, dtype=float).reshape(-1)
    if ratios.size == 0 or np.any(ratios <= 0) or not np.all(np.isfinite(ratios)):
        raise ValueError(f"remodel ratios must be positive and finite, got {ratios.tolist()}")
    if not np.isfinite(distance) or distance < 0:
        raise ValueError(f"distance must be finite and >= 0, got {distance}")
    tail = np.concatenate([[float(distance)], rep])
    return np.column_stack([ratios, np.tile(tail, (ratios.size, 1))])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def calibration_weights(dist_to_past: Sequence[float]) -> np.ndarray:
    """Eq. 5: sigma_1..sigma_{k-1} = softmax(1/dis_{k,1}, ..., 1/dis_{k,k-1}).

    Distances are clamped to :data:`MIN_DOMAIN_DISTANCE` first, so a past domain at distance 0
    gets (numerically) all the weight.
    """
    dist = np.asarray(dist_to_past, dtype=float).reshape(-1)
    if not np.all(np.isfinite(dist)) or np.any(dist < 0):
        raise ValueError(f"distances to past domains must be finite and >= 0, got {dist.tolist()}")
    return _softmax(1.0 / np.maximum(dist, MIN_DOMAIN_DISTANCE))


def _check_accuracies(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        raise ValueError(f"{name} must be accuracies in [0, 1] (fractions, not percent), got {values}")


def calibrate(pred_before, pred_after, dist_to_past, past_before,
              past_after) -> tuple[np.ndarray, np.ndarray]:
    """Calibrate predicted accuracies with the monitored accuracies of past domains (eq. 5-7).

    A  <- CALIBRATION_MIX * A  + (1 - CALIBRATION_MIX) * sum_a sigma_a rA^(a)     (eq. 6)
    Ã  <- CALIBRATION_MIX * Ã  + (1 - CALIBRATION_MIX) * sum_a sigma_a rÃ^(a)     (eq. 7)

    Parameters
    ----------
    pred_before, pred_after : array_like
        Predicted A and Ã of the current domain k, any common shape P (a scalar, (C,) sizes ...).
    dist_to_past : array_like
        (K,) distances dis_{k,a} to the K = k-1 past domains. Empty: nothing to calibrate with,
        the predictions come back unchanged.
    past_before, past_after : array_like
        (K, *P) monitored accuracies rA^(a), rÃ^(a) of the past domains.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Calibrated (A, Ã), shape P.
    """
    before, after = np.asarray(pred_before, dtype=float), np.asarray(pred_after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"pred_before {before.shape} and pred_after {after.shape} must have the same shape")
    _check_accuracies("pred_before", before)
    _check_accuracies("pred_after", after)
    dist = np.asarray(dist_to_past, dtype=float).reshape(-1)
    if dist.size == 0:
        return before.copy(), after.copy()
    past_a, past_at = np.asarray(past_before, dtype=float), np.asarray(past_after, dtype=float)
    expected = (dist.size, *before.shape)
    if past_a.shape != expected or past_at.shape != expected:
        raise ValueError(f"past accuracies must have shape {expected} (one row per past domain), "
                         f"got {past_a.shape} and {past_at.shape}")
    _check_accuracies("past_before", past_a)
    _check_accuracies("past_after", past_at)
    sigma = calibration_weights(dist)
    mix = CALIBRATION_MIX
    return (mix * before + (1 - mix) * np.tensordot(sigma, past_a, axes=1),
            mix * after + (1 - mix) * np.tensordot(sigma, past_at, axes=1))


def _seeded_mlp(sizes: Sequence[int], generator: torch.Generator) -> nn.Sequential:
    """Linear-ReLU stack ending in a sigmoid; PyTorch's default U(+-1/sqrt(fan_in)) init, seeded."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # no draw from the global RNG
        bound = 1.0 / np.sqrt(fan_in)
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers.append(linear)
        layers.append(nn.ReLU() if index < len(sizes) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers)


class AccuracyEstimator:
    """The tiny fully connected accuracy predictor of ElasticDNN section III-C1.

    Maps rows I = [s, dis_{0,k}, domain representation] (see :func:`estimator_inputs`) to
    O = (A before retraining, Ã after retraining), each in [0, 1] through a sigmoid. Inputs are
    standardised with the training rows' mean and standard deviation (our choice: ratio,
    distance and features live on different scales).

    Parameters
    ----------
    input_dim : int
        Length of an input row: 2 + the representation's length.
    hidden_sizes : Sequence[int]
        Hidden layer widths (default :data:`HIDDEN_SIZES`, an assumption).
    """

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int] = HIDDEN_SIZES):
        if int(input_dim) < 1 or any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"input_dim and hidden sizes must be >= 1, got {input_dim}, {tuple(hidden_sizes)}")
        self.input_dim = int(input_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.net: nn.Sequential | None = None
        self.loss_history: list[float] = []
        self._mean = np.zeros(self.input_dim)
        self._scale = np.ones(self.input_dim)

    def _check_inputs(self, inputs) -> np.ndarray:
        array = np.asarray(inputs, dtype=float)
        if array.ndim != 2 or array.shape[1] != self.input_dim or array.shape[0] < 1:
            raise ValueError(f"inputs must be (rows, {self.input_dim}), got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError("inputs contain NaN or inf")
        return array

    def _tensor(self, inputs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((inputs - self._mean) / self._scale, dtype=torch.float32)

    def fit(self, inputs, targets, epochs: int = FIT_EPOCHS, lr: float = FIT_LR, seed: int = 0) -> "AccuracyEstimator":
        """Train offline on measured adaptation runs (fresh seeded weights on every call).

        Parameters
        ----------
        inputs : array_like
            (m, input_dim) rows I.
        targets : array_like
            (m, 2) measured (A before, Ã after), in [0, 1].
        epochs, lr : int, float
            Full-batch Adam steps on the mean squared error and its learning rate
            (defaults :data:`FIT_EPOCHS`, :data:`FIT_LR`; assumptions).
        seed : int
            Seeds the weight initialisation.

        Returns
        -------
        AccuracyEstimator
            ``self``; ``loss_history`` holds the training MSE of every epoch.
        """
        x = self._check_inputs(inputs)
        y = np.asarray(targets, dtype=float)
        if y.shape != (x.shape[0], N_OUTPUTS):
            raise ValueError(f"targets must be ({x.shape[0]}, {N_OUTPUTS}) = (A before, A after) per row, "
                             f"got shape {y.shape}")
        _check_accuracies("targets", y)
        if int(epochs) < 1 or not lr > 0:
            raise ValueError(f"need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
        self._mean = x.mean(axis=0)
        self._scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        generator = torch.Generator().manual_seed(int(seed))
        self.net = _seeded_mlp((self.input_dim, *self.hidden_sizes, N_OUTPUTS), generator)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=lr)
        features, labels = self._tensor(x), torch.as_tensor(y, dtype=torch.float32)
        self.loss_history = []
        for _ in range(int(epochs)):
            optimiser.zero_grad()
            loss = torch.mean((self.net(features) - labels) ** 2)
            loss.backward()
            optimiser.step()
            self.loss_history.append(float(loss.detach()))
        return self

    def predict(self, inputs) -> np.ndarray:
        """Predicted (A before, Ã after) for each input row: an (m, 2) array in [0, 1]."""
        if self.net is None:
            raise RuntimeError("AccuracyEstimator.predict called before fit; fit it on measured runs first")
        x = self._check_inputs(inputs)
        with torch.no_grad():
            return self.net(self._tensor(x)).double().numpy()
