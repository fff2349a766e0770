"""Feature vectors of a model for ElasticDNN's feature-based losses (seed 003, section III-B).

The features are the input of one module (default: the last ``nn.Linear``, i.e. what the
classifier head reads), captured with a forward pre-hook. :func:`feature_statistics` summarises
the source features once, offline, for the ``"feature_alignment"`` loss (the paper's ref. [8]).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.elastic.losses import channel_statistics
from models.elastic.modes import check_batch


def feature_layer(model: nn.Module, name: str | None) -> nn.Module:
    """The module whose input is the feature vector.

    Parameters
    ----------
    model : nn.Module
        The network.
    name : str or None
        Qualified module name; None = the last ``nn.Linear`` of ``model``.

    Returns
    -------
    nn.Module
        The module.

    Raises
    ------
    ValueError
        If ``name`` is not a module of ``model``, or ``name`` is None and there is no
        ``nn.Linear``.
    """
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"feature_module {name!r} is not a module of {type(model).__name__}; "
                             f"pass one of {sorted(n for n in modules if n)[:8]}...")
        return modules[name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to read features from; "
                         "pass feature_module=<name of the module whose input are the features>")
    return linears[-1]


def forward_with_features(model: nn.Module, module: nn.Module,
                          x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``model(x)`` and the (flattened) input of ``module`` on its last call.

    Parameters
    ----------
    model : nn.Module
        The network.
    module : nn.Module
        A module of ``model`` on the path to the logits (e.g. from :func:`feature_layer`).
    x : Tensor
        Model inputs, shape (N, ...).

    Returns
    -------
    tuple of Tensor
        ``(features (N, D), logits)``.

    Raises
    ------
    ValueError
        If ``module`` is not called in the forward pass.
    """
    captured: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"feature module {type(module).__name__} was not called in the forward "
                         "pass; pass feature_module=<a module on the path to the logits>")
    return captured[-1].flatten(1), logits


def feature_statistics(model: nn.Module, x: Tensor, *,
                       feature_module: str | None = None) -> dict[str, Tensor]:
    """Per-channel mean and unbiased variance of the source features, for ``"feature_alignment"``.

    Computed like TTT++'s offline summary (Liu et al. 2021): model in eval mode, no gradient, over
    the source samples ``x``. Features are the input of ``feature_module`` (default: the last
    ``nn.Linear``, i.e. what the classifier head reads). Modes are restored afterwards.

    Parameters
    ----------
    model : nn.Module
        The source-trained network.
    x : Tensor
        Source samples, shape (N >= 2, ...).
    feature_module : str, optional
        Name of the module whose *input* is the feature vector (see :func:`feature_layer`).

    Returns
    -------
    dict of str to Tensor
        ``{"mean": (D,), "var": (D,)}``.
    """
    check_batch(x)
    module = feature_layer(model, feature_module)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            features, _ = forward_with_features(model, module, x)
    finally:
        for m, mode in modes:
            m.train(mode)
    mean, var = channel_statistics(features)
    return {"mean": mean, "var": var}
