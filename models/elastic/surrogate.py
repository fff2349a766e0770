"""ElasticDNN's surrogate generation (sec. III-B2) and the way back into the master (III-B3).

Steps (paper III-B2):

1. :func:`hardest_sample` -- the target batch's sample with the highest prediction entropy
   ``H(y) = -sum_c p_c log p_c`` of the master (:func:`models.losses.prediction_entropy`).
2. :func:`gate_relevance` -- one master forward on that sample; the FBS gate values ``p_i`` of
   every conv are the filters' relevance. :func:`select_filters` keeps the top fraction of
   every channel group (:meth:`~models.elastic.fbs_resnet.FBSResNet.channel_groups`): a group that
   several units write (a residual stream) ranks its channels by the mean relevance of its
   writers, so one selection serves every addition. :func:`extract_surrogate` then builds a
   physically smaller network of the same class from the kept filters (real smaller conv,
   BN, gate-Linear and classifier-input tensors; the gates are kept, restricted to the kept
   filters and kept input channels).

The baseline "pruned small model" (paper sec. IV: compressed models "removing 80% filters")
uses :func:`magnitude_keep`: the same group rules and rounding, filters ranked by L1 norm,
so both produce networks of identical size.

Equivalence: a surrogate computes exactly what the master computes with the dropped filters
masked out (:func:`apply_keep_masks`): every dropped channel is then 0 in every feature map,
so the inputs it would feed contribute nothing and the smaller tensors give the same sums.
This holds with top-k gating switched off (the inference setting); with top-k the two
networks count ``k`` over different channel sets.

The way back (III-B3, eq. 3): :func:`surrogate_deltas` turns a retrained surrogate into
``{layer: (master filter indices, delta_theta)}`` for
:func:`~models.elastic.bank.update_bank_and_master`. A surrogate filter holds only the kept input
channels of its master filter; its delta is written into the kept ``[out, in]`` sub-block of
a full-size filter and is 0 on the dropped input channels (nothing was learned there).
:func:`write_back_bn` copies the kept channels' BN parameters back directly (the bank covers
conv filters only, as in the paper).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from models.elastic.fbs import ChannelGroup, check_fraction, gated_units, kept_count
from models.losses import prediction_entropy

#: Share of filters a surrogate keeps (paper III-B3 running example: "20% of the most
#: accuracy-relevant filters"; sec. IV baselines remove 80% of filters).
SURROGATE_KEEP_FRACTION = 0.2
#: Layer plan entry: (kept output channels or None, kept input channels or None = all).
LayerPlan = dict[str, tuple[Tensor | None, Tensor | None]]


# --------------------------------------------------------------------------- step 1 and 2
@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode under no_grad and restore every module's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, mode in modes:
            module.training = mode


def hardest_sample(master: nn.Module, x: Tensor) -> int:
    """Index of the sample of ``x`` whose master prediction has the highest entropy (ties: first).

    The master runs once in eval mode (its modes are restored).
    """
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"hardest_sample needs a non-empty batch, got a tensor of shape {tuple(x.shape)}")
    with _evaluating(master):
        return int(torch.argmax(prediction_entropy(master(x), log_space=True)))


def gate_relevance(master: nn.Module, x_one: Tensor) -> dict[str, Tensor]:
    """Gate values ``p_i`` ``[filters]`` of every gated unit for one sample (paper eq. 2).

    ``x_one`` is one image ``[C, H, W]`` or a batch of one. The values are the gates as
    predicted (before keep masks and top-k); the master runs in eval mode as it is, so
    clear any keep masks (:func:`clear_keep_masks`) and top-k first to score the full master.
    """
    batch = x_one.unsqueeze(0) if x_one.ndim == 3 else x_one
    if batch.ndim != 4 or len(batch) != 1:
        raise ValueError(f"gate_relevance needs one image [C, H, W] or [1, C, H, W], got {tuple(x_one.shape)}")
    with _evaluating(master):
        master(batch)
    return {name: unit.last_raw_gates[0].clone() for name, unit in gated_units(master)}


def select_filters(relevance: Mapping[str, Tensor], groups: tuple[ChannelGroup, ...],
                   keep_fraction: float = SURROGATE_KEEP_FRACTION) -> dict[str, Tensor]:
    """Kept channels of every group: the ``ceil(keep_fraction * size)`` (>= 1) most relevant.

    Parameters
    ----------
    relevance : mapping of str to Tensor
        ``unit name -> scores [filters]`` (a ``[B, filters]`` tensor is averaged over rows).
    groups : tuple of ChannelGroup
        The network's channel groups; a group ranks by the mean score of its writers.
    keep_fraction : float
        In (0, 1].

    Returns
    -------
    dict of str to Tensor
        ``group name -> sorted kept channel indices`` (ties broken by lower index).
    """
    check_fraction(keep_fraction)
    keep = {}
    for group in groups:
        missing = [w for w in group.writers if w not in relevance]
        if missing:
            raise ValueError(f"relevance misses the unit(s) {missing} of group {group.name!r}")
        scores = [relevance[w].mean(0) if relevance[w].ndim == 2 else relevance[w] for w in group.writers]
        if any(s.shape != (group.size,) for s in scores):
            raise ValueError(f"relevance of group {group.name!r} must hold {group.size} values per unit")
        score = torch.stack([s.detach().float() for s in scores]).mean(0)
        order = torch.argsort(score, descending=True, stable=True)
        keep[group.name] = torch.sort(order[: kept_count(group.size, keep_fraction)]).values
    return keep


def magnitude_keep(master: nn.Module, keep_fraction: float = SURROGATE_KEEP_FRACTION) -> dict[str, Tensor]:
    """The pruned-small-model baseline: keep the filters of largest L1 norm, same group rules."""
    scores = {name: unit.conv.weight.detach().abs().sum(dim=(1, 2, 3)) for name, unit in gated_units(master)}
    return select_filters(scores, master.channel_groups(), keep_fraction)


# --------------------------------------------------------------------------- keep plans
def check_keep(groups: tuple[ChannelGroup, ...], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``keep`` with every group present, as sorted distinct in-range long tensors; else ValueError."""
    names = {g.name for g in groups}
    unknown = sorted(set(keep) - names)
    missing = sorted(names - set(keep))
    if unknown or missing:
        raise ValueError(f"keep must name exactly the channel groups: unknown {unknown}, missing {missing}")
    checked = {}
    for group in groups:
        idx = torch.as_tensor(keep[group.name], dtype=torch.long).reshape(-1)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= group.size or len(torch.unique(idx)) != len(idx):
            raise ValueError(f"keep[{group.name!r}] must hold >= 1 distinct index in 0..{group.size - 1}, "
                             f"got {idx.tolist()}")
        checked[group.name] = torch.sort(idx).values
    return checked


def layer_indices(groups: tuple[ChannelGroup, ...], keep: Mapping[str, Tensor]) -> LayerPlan:
    """``module name -> (kept output channels, kept input channels)`` from a group keep.

    The output entry is None for a pure reader (the classifier), the input entry None for a
    unit that reads the image (the stem). This is also the reverse map of a surrogate: its
    layer ``name`` holds the master filters ``out`` restricted to the input channels ``in``.
    """
    keep = check_keep(groups, keep)
    plan: dict[str, list] = {}
    for group in groups:
        for writer in group.writers:
            plan.setdefault(writer, [None, None])[0] = keep[group.name]
        for reader in group.readers:
            plan.setdefault(reader, [None, None])[1] = keep[group.name]
    return {name: (out, inp) for name, (out, inp) in plan.items()}


@torch.no_grad()
def apply_keep_masks(master: nn.Module, keep: Mapping[str, Tensor]) -> None:
    """Mask out the dropped filters of ``master`` in place (the "masked master")."""
    plan = layer_indices(master.channel_groups(), keep)
    for name, unit in gated_units(master):
        unit.keep_mask.zero_()
        unit.keep_mask[plan[name][0]] = 1.0


@torch.no_grad()
def clear_keep_masks(master: nn.Module) -> None:
    """Keep every filter of ``master`` again."""
    for _, unit in gated_units(master):
        unit.keep_mask.fill_(1.0)


# --------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_surrogate(master: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """A physically smaller copy of ``master`` holding only the kept channels of every group.

    The master must expose ``channel_groups()`` and ``resized(group_sizes)`` (as
    :class:`~models.elastic.fbs_resnet.FBSResNet` does). The surrogate is built on the meta device
    and receives copies of the sliced master tensors unit by unit (no copy of the whole
    master, no random draws); it starts in the master's train/eval mode with top-k off.
    """
    groups = master.channel_groups()
    keep = check_keep(groups, keep)
    plan = layer_indices(groups, keep)
    state: dict[str, Tensor] = {}
    for name, unit in gated_units(master):
        out_idx, in_idx = plan[name]
        state.update({f"{name}.{key}": value for key, value in unit.sliced_state(out_idx, in_idx).items()})
    for name, module in master.named_modules():
        if isinstance(module, nn.Linear) and name in plan:  # a reader outside the units: the classifier
            state[f"{name}.weight"] = module.weight.index_select(1, plan[name][1])
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().clone()
    surrogate = master.resized({group: len(idx) for group, idx in keep.items()})
    surrogate.load_state_dict(state, strict=True, assign=True)
    return surrogate.train(master.training)


def generate_surrogate(master: nn.Module, x: Tensor, keep_fraction: float = SURROGATE_KEEP_FRACTION):
    """Steps 1-2 in one call: ``(surrogate, keep, hardest sample index)`` for the target batch ``x``."""
    index = hardest_sample(master, x)
    keep = select_filters(gate_relevance(master, x[index]), master.channel_groups(), keep_fraction)
    return extract_surrogate(master, keep), keep, index


# --------------------------------------------------------------------------- back to the master
def _paired_units(master: nn.Module, surrogate: nn.Module, keep: Mapping[str, Tensor]):
    """``(name, master unit, surrogate unit, out_idx, in_idx)``; ValueError if the surrogate does not fit."""
    plan = layer_indices(master.channel_groups(), keep)
    small = dict(gated_units(surrogate))
    for name, unit in gated_units(master):
        out_idx, in_idx = plan[name]
        n_in = unit.conv.in_channels if in_idx is None else len(in_idx)
        if name not in small or tuple(small[name].conv.weight.shape[:2]) != (len(out_idx), n_in):
            raise ValueError(f"surrogate layer {name!r} does not match keep (expected {len(out_idx)} filters x "
                             f"{n_in} inputs); pass the keep the surrogate was extracted with")
        yield name, unit, small[name], out_idx, in_idx


@torch.no_grad()
def surrogate_deltas(master: nn.Module, surrogate: nn.Module, keep: Mapping[str, Tensor],
                     changed_only: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Filter changes of a retrained surrogate as master-sized deltas for eq. 3.

    Parameters
    ----------
    master, surrogate : nn.Module
        The master and a surrogate extracted from it with ``keep``.
    keep : mapping
        The group keep used for the extraction.
    changed_only : bool
        Only list filters whose weights differ from the master's (the paper's "changed
        filters"); layers without one are left out.

    Returns
    -------
    dict
        ``layer -> (master filter indices [m], delta [m, *master filter shape])``: the
        surrogate filter minus the master filter on the kept input channels, 0 elsewhere.
    """
    deltas = {}
    for name, unit, small, out_idx, in_idx in _paired_units(master, surrogate, keep):
        current = unit.conv.weight.index_select(0, out_idx)
        diff = small.conv.weight - (current if in_idx is None else current.index_select(1, in_idx))
        full = torch.zeros_like(current)
        if in_idx is None:
            full.copy_(diff)
        else:
            full[:, in_idx] = diff
        rows = (diff.flatten(1) != 0).any(dim=1) if changed_only else torch.ones(len(out_idx), dtype=torch.bool)
        if rows.any():
            deltas[name] = (out_idx[rows], full[rows])
    return deltas


@torch.no_grad()
def write_back_bn(master: nn.Module, surrogate: nn.Module, keep: Mapping[str, Tensor],
                  include_running_stats: bool = False) -> None:
    """Copy the surrogate's BN affine parameters (gamma, beta) of the kept filters into the master.

    The paper's bank (eq. 1-4) covers conv filters only and is silent on BN; BN parameters
    are per filter, so they go back directly. Running statistics describe the target
    domain's data, which the master's dropped filters never saw, so they are copied only on
    request (our assumption; the default keeps the master's source statistics).
    """
    for _, unit, small, out_idx, _ in _paired_units(master, surrogate, keep):
        keys = ("weight", "bias") + (("running_mean", "running_var") if include_running_stats else ())
        for key in keys:
            getattr(unit.bn, key)[out_idx] = getattr(small.bn, key).detach()


# --------------------------------------------------------------------------- sizes
def parameter_count(module: nn.Module) -> int:
    """Number of trainable and frozen parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def conv_parameter_count(module: nn.Module) -> int:
    """Number of conv-filter weights of the gated units of ``module`` (the filters a surrogate keeps)."""
    return sum(unit.conv.weight.numel() for _, unit in gated_units(module))
