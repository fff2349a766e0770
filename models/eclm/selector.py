"""ECLM's unified module selector (section 4.2) and noisy top-k gating (Shazeer et al. 2017).

One small embedding network ``h = embed(x)`` feeds one linear head per module layer, so
the modules of every layer are chosen in a single pass over the input (ECLM 4.2). Top-k
selection is made trainable with Shazeer et al.'s noisy top-k gating (ECLM 4.3, footnote 3):
in training, ``H(x) = x W_g + N(0, 1) * softplus(x W_noise)``, the gates are a softmax over
the k largest entries of ``H`` and zero elsewhere, and the auxiliary loss
``w * (CV^2(importance) + CV^2(load))`` balances the modules' use.

Reference: N. Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR 2017, sections 2.1 and 4 and appendix A; and its public
PyTorch port (davidmrau/mixture-of-experts), named "(code)" below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Load-balancing weight w (ALGORITHMS.md, ECLM; Shazeer et al. use 1e-2 as well).
LOAD_BALANCE_WEIGHT = 1e-2
#: Floor added to the noise standard deviation softplus(x W_noise) (code: ``noise_epsilon``).
NOISE_EPSILON = 1e-2
#: Guard against a zero mean in CV^2 = var / mean^2 (code: ``cv_squared``'s eps).
CV_EPS = 1e-10
#: Width of the selector's embedding h (assumption: the paper only says "lightweight").
SELECTOR_EMBED_DIM = 32


def _as_active(active: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """The boolean mask of selectable modules (all of them when ``active`` is None)."""
    if active is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if active.shape != (n,) or active.dtype != torch.bool:
        raise ValueError(f"active must be a bool tensor of shape ({n},), got {active.dtype} {tuple(active.shape)}")
    if not bool(active.any()):
        raise ValueError("active selects no module; keep at least one module per layer")
    return active


def noisy_top_k(
    logits: torch.Tensor,
    noise_logits: torch.Tensor | None,
    k: int,
    training: bool,
    active: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating of one module layer (Shazeer et al. 2017, eq. 3-5).

    Parameters
    ----------
    logits : Tensor
        (B, N) clean selector logits ``x W_g``.
    noise_logits : Tensor or None
        (B, N) ``x W_noise``; the noise std is ``softplus(noise_logits) + NOISE_EPSILON``.
        Only used when ``training``.
    k : int
        Modules activated per sample; ``min(k, active modules)`` are used.
    training : bool
        Add noise to the logits (training) or gate on the clean logits (evaluation).
    active : Tensor or None
        (N,) bool: modules that may be selected (a sub-model's held modules); the rest
        get logit -inf and are never chosen. None means every module.
    generator : torch.Generator or None
        Source of the Gaussian noise (None: torch's global generator).

    Returns
    -------
    gates : Tensor
        (B, N): softmax over each row's top-k (noisy) logits, zero elsewhere; rows sum to 1.
    load : Tensor
        (N,) expected number of samples routed to each module. In training with
        ``k < active modules`` this is Shazeer's smooth, differentiable estimator (appendix
        A: sum over samples of P(module in top-k | resampled noise)); otherwise the
        plain count of samples whose gate is nonzero. Zero for inactive modules.
    importance : Tensor
        (N,) sum of the gates over the batch (Shazeer eq. 6).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, modules), got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = logits.shape[1]
    active = _as_active(active, n, logits.device)
    k_eff = min(k, int(active.sum()))
    clean = logits.masked_fill(~active, -math.inf)
    noisy, std = clean, None
    if training and noise_logits is not None:
        std = F.softplus(noise_logits) + NOISE_EPSILON
        noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        noisy = clean + noise * std
    top_values, top_index = noisy.topk(min(k_eff + 1, int(active.sum())), dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_index[:, :k_eff], torch.softmax(top_values[:, :k_eff], dim=1))
    importance = gates.sum(0)
    if std is not None and k_eff < int(active.sum()):
        load = _smooth_load(logits, noisy, std, top_values, k_eff, active)
    else:
        load = (gates > 0).to(logits.dtype).sum(0)
    return gates, load, importance


def _smooth_load(logits, noisy, std, top_values, k, active) -> torch.Tensor:
    """Shazeer appendix A: P(module i stays in the top-k when only its own noise is redrawn).

    For a module in the top-k the threshold to beat is the (k+1)-th largest noisy logit;
    for one outside it is the k-th. Inactive modules are given finite stand-in logits
    before the normal CDF (so no inf reaches autograd) and a load of exactly 0.
    """
    safe_clean = torch.where(active, logits, torch.zeros_like(logits))
    safe_noisy = torch.where(active, noisy, torch.zeros_like(noisy))
    threshold_in = top_values[:, k : k + 1]
    threshold_out = top_values[:, k - 1 : k]
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in = normal.cdf((safe_clean - threshold_in) / std)
    prob_out = normal.cdf((safe_clean - threshold_out) / std)
    prob = torch.where(safe_noisy > threshold_in, prob_in, prob_out)
    return torch.where(active, prob, torch.zeros_like(prob)).sum(0)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance); 0 for < 2 values.

    The population variance is what the authors' own code uses (tensor2tensor,
    ``tensor2tensor/utils/expert_utils.py``, ``cv_squared``: sum of squared deviations / size);
    the PyTorch port (davidmrau/mixture-of-experts) uses torch's unbiased variance, larger by
    the constant factor N / (N - 1).
    """
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean() ** 2 + CV_EPS)


def load_balance_loss(
    importance: torch.Tensor, load: torch.Tensor, weight: float = LOAD_BALANCE_WEIGHT
) -> torch.Tensor:
    """``weight * (CV^2(importance) + CV^2(load))`` (Shazeer et al. eq. 6-7, appendix A).

    Pass only the active modules' entries (a sub-model balances among what it holds).
    """
    if importance.shape != load.shape or importance.dim() != 1:
        raise ValueError(
            f"importance and load must be 1-d of equal shape, got {tuple(importance.shape)} and {tuple(load.shape)}"
        )
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    return weight * (cv_squared(importance) + cv_squared(load))


def conv_embedding(in_channels: int, embed_dim: int) -> nn.Sequential:
    """Two stride-2 3x3 convs with ReLU and a global average pool: ``h`` for images.

    No BatchNorm (assumption): a sample's routing then does not depend on its batch.
    """
    hidden = max(embed_dim // 2, 1)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, embed_dim, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def mlp_embedding(in_features: int, embed_dim: int) -> nn.Sequential:
    """Flatten, one linear layer and ReLU: ``h`` for vector (flattened) inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, embed_dim), nn.ReLU())


class UnifiedSelector(nn.Module):
    """ECLM 4.2's unified module selector: ``g(x) = {g_l(h) | h = embed(x)}`` for all layers.

    Parameters
    ----------
    input_shape : tuple[int, ...]
        Shape of one input sample, (C, H, W).
    layer_sizes : list[int]
        Modules N_l of every module layer (one head of N_l outputs each).
    embed_dim : int
        Width of the embedding h.
    kind : str
        ``"conv"`` (a small conv net, for images) or ``"mlp"`` (for flattened vectors).

    Attributes
    ----------
    embed : nn.Sequential
        The embedding network.
    heads : nn.ModuleList
        One ``Linear(embed_dim, N_l)`` per layer: the clean gating logits ``h W_g``.
    noise_heads : nn.ModuleList
        One ``Linear(embed_dim, N_l)`` per layer: ``h W_noise``, zero-initialised as in
        Shazeer et al. section 4 ("no signal and some noise" at the start).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        layer_sizes: list[int],
        embed_dim: int = SELECTOR_EMBED_DIM,
        kind: str = "conv",
    ) -> None:
        super().__init__()
        if kind == "conv":
            self.embed = conv_embedding(input_shape[0], embed_dim)
        elif kind == "mlp":
            self.embed = mlp_embedding(math.prod(input_shape), embed_dim)
        else:
            raise ValueError(f"unknown selector kind {kind!r}; choose 'conv' or 'mlp'")
        self.heads = nn.ModuleList(nn.Linear(embed_dim, n) for n in layer_sizes)
        self.noise_heads = nn.ModuleList(nn.Linear(embed_dim, n) for n in layer_sizes)
        for head in self.noise_heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def logits_and_noise(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Clean logits and noise logits of every layer from one embedding pass."""
        h = self.embed(x)
        return [head(h) for head in self.heads], [head(h) for head in self.noise_heads]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw (clean) logits per layer, each (B, N_l)."""
        h = self.embed(x)
        return [head(h) for head in self.heads]
