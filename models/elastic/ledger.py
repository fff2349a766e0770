"""What one adaptation executed: every network pass, its FLOPs and the memory its training step held.

ElasticDNN's claims compare methods by the work they run on the device (seed 003, IV: adaptation
time and memory). :class:`PassLedger` records, while an adaptation runs on this thread, every
top-level call of an ``nn.Module`` (a *pass*: the network, its input shape, the parameters that
required a gradient, the modules' train/eval flags, and whether a gradient flowed back through
its output) and, for passes that build a graph, the bytes of the tensors autograd saved for the
backward (the activations).

FLOPs are counted by torch's own counter (``torch.utils.flop_counter.FlopCounterMode``, via
:func:`models.costs.flop_counter`) but not during the timed adaptation: on this CPU the counter
makes a training step of the width-16 master 2.8x slower (0.30 s -> 0.83 s at batch 64, measured),
which would distort the measured wall time. :meth:`PassLedger.flops` instead replays ONE pass of
every distinct kind afterwards, under the counter, on a copy of the network with the recorded
flags and a zero input of the recorded shape, and multiplies by how often that kind ran. The
counter counts matrix products and convolutions only (its registry), whose FLOPs depend on shapes
and on which gradients are computed, not on the values, so the replay counts what ran. A kind's
count is kept per process by the network's structure (:func:`structure`), so the next domain's
passes of the same networks are not replayed again. Work
outside any network (the bank update of eq. 3-4, SHOT's centroid search) runs under the counter
directly: wrap it in :func:`counted_block`.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from models.costs import flop_counter

#: The ledger recording on the current thread (None when none is).
_ACTIVE = threading.local()
#: Replayed FLOPs by pass signature (structure, shape, gradients, modes); emptied when it holds
#: this many (a run meets a handful of network shapes; the bound only caps a long process).
REPLAY_CACHE_SIZE = 1024
_REPLAYED: dict[tuple, float] = {}


@dataclass
class NetworkPass:
    """One top-level call of a network during the recording.

    Attributes
    ----------
    module : nn.Module
        The network called.
    shape : tuple of int
        Shape of its input tensor.
    trained : tuple of str
        Names of its parameters that required a gradient (empty when gradients were off).
    modes : tuple of bool
        ``training`` of every module of the network (``module.modules()`` order).
    backward : bool
        A gradient flowed back through the output (``backward`` or ``autograd.grad``).
    activation_bytes : int
        Bytes of the tensors autograd saved for the backward, each storage once, the network's
        own parameters and buffers left out (they are resident anyway).
    gradient_bytes : int
        Bytes of the parameters in ``trained``: the gradients a backward through it materialises.
    """

    module: nn.Module
    shape: tuple[int, ...]
    trained: tuple[str, ...]
    modes: tuple[bool, ...]
    backward: bool = False
    activation_bytes: int = 0
    gradient_bytes: int = 0

    def kind(self) -> tuple:
        """What fixes the pass's FLOPs: network, input shape, gradients computed, modes."""
        return id(self.module), self.shape, self.trained, self.modes, self.backward


class PassLedger:
    """Records the network passes run inside :meth:`recording` on the calling thread.

    Other threads' calls are ignored (devices simulated in threads of one process each keep
    their own ledger). Calls nested in a recorded call (its layers) belong to that pass.
    """

    def __init__(self) -> None:
        self.passes: list[NetworkPass] = []
        self.direct_flops = 0.0
        self._thread: int | None = None
        self._depth = 0
        self._paused = 0
        self._current: NetworkPass | None = None
        self._saving = None
        self._saved: dict[int, int] = {}
        self._own: set[int] = set()

    @contextmanager
    def recording(self) -> Iterator[PassLedger]:
        """Record every top-level network call of this thread inside the block."""
        if getattr(_ACTIVE, "ledger", None) is not None:
            raise RuntimeError("another PassLedger records on this thread already; record one adaptation at a time")
        self._thread, self._depth = threading.get_ident(), 0
        _ACTIVE.ledger = self
        handles = (register_module_forward_pre_hook(self._enter),
                   register_module_forward_hook(self._leave, always_call=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._stop_saving()
            _ACTIVE.ledger, self._thread = None, None

    # ----------------------------------------------------------------------- hooks
    def _ours(self) -> bool:
        return threading.get_ident() == self._thread and not self._paused

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not self._ours():
            return
        self._depth += 1
        if self._depth > 1:
            return
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"{type(module).__name__} was called without a tensor as its first argument; "
                             "the ledger replays passes from their input shape")
        grad = torch.is_grad_enabled()
        named = [(n, p) for n, p in module.named_parameters() if grad and p.requires_grad]
        self._current = NetworkPass(module, tuple(args[0].shape), tuple(n for n, _ in named),
                                    tuple(m.training for m in module.modules()),
                                    gradient_bytes=sum(p.numel() * p.element_size() for _, p in named))
        if named:
            self._own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
            self._saved = {}
            self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._saving.__enter__()

    def _leave(self, module: nn.Module, args: tuple, output) -> None:
        if not self._ours() or self._depth == 0:
            return
        self._depth -= 1
        if self._depth > 0 or self._current is None:
            return
        self._stop_saving()
        done, self._current = self._current, None
        done.activation_bytes = sum(self._saved.values())
        self._saved = {}
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: _mark_backward(done, grad))
        self.passes.append(done)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._own:
            self._saved[pointer] = storage.nbytes()
        return tensor

    def _stop_saving(self) -> None:
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None

    # ----------------------------------------------------------------------- results
    def training_peak(self) -> tuple[int, int]:
        """``(activation_bytes, gradient_bytes)`` of the backward pass that held the most of both.

        ``(0, 0)`` when no pass ran a backward (a method that trains nothing).
        """
        trained = [p for p in self.passes if p.backward]
        if not trained:
            return 0, 0
        peak = max(trained, key=lambda p: p.activation_bytes + p.gradient_bytes)
        return peak.activation_bytes, peak.gradient_bytes

    def flops(self) -> float:
        """FLOPs of everything recorded: ``sum over pass kinds of count x replayed FLOPs`` + direct blocks.

        Each distinct :meth:`NetworkPass.kind` is replayed once under torch's FLOP counter
        (:func:`replay_flops`, cached by :func:`signature`); :func:`counted_block` work is added
        as counted.
        """
        if self._thread is not None:
            raise RuntimeError("PassLedger.flops() replays passes: call it after the recording block")
        counts = Counter(p.kind() for p in self.passes)
        first = {}
        for p in self.passes:
            first.setdefault(p.kind(), p)
        return self.direct_flops + sum(count * cached_replay_flops(first[kind]) for kind, count in counts.items())


def structure(module: nn.Module) -> tuple:
    """What fixes a network's counted FLOPs at a given input: its layers (``repr``) and parameter shapes."""
    return repr(module), tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def signature(network_pass: NetworkPass) -> tuple:
    """:meth:`NetworkPass.kind` with the network's :func:`structure` in place of its identity."""
    return structure(network_pass.module), *network_pass.kind()[1:]


def cached_replay_flops(network_pass: NetworkPass) -> float:
    """:func:`replay_flops`, replayed once per process for every :func:`signature`."""
    key = signature(network_pass)
    if key not in _REPLAYED:
        if len(_REPLAYED) >= REPLAY_CACHE_SIZE:
            _REPLAYED.clear()
        _REPLAYED[key] = replay_flops(network_pass)
    return _REPLAYED[key]


def _mark_backward(done: NetworkPass, grad: Tensor) -> Tensor:
    done.backward = True
    return grad


def replay_flops(network_pass: NetworkPass) -> float:
    """FLOPs of one pass, counted by torch on a copy of its network (zero input, recorded flags).

    A pass with ``backward`` also computes the gradients of its ``trained`` parameters
    (``autograd.grad`` of the output's sum: the counted backward products depend on which
    gradients are needed, not on the loss).
    """
    network = copy.deepcopy(network_pass.module)
    modules = list(network.modules())
    if len(modules) != len(network_pass.modes):
        raise ValueError(f"{type(network).__name__} changed its module tree after the recorded pass; "
                         "replay needs the network as it ran")
    for module, mode in zip(modules, network_pass.modes):
        module.training = mode
    trained = [p for n, p in network.named_parameters() if n in network_pass.trained]
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name in network_pass.trained)
    counter = flop_counter()
    with torch.enable_grad(), counter:
        output = network(torch.zeros(network_pass.shape))
        if network_pass.backward and trained:
            torch.autograd.grad(output.sum(), trained)
    return float(counter.get_total_flops())


@contextmanager
def counted_block() -> Iterator[None]:
    """Count the block's FLOPs with torch's counter into the ledger recording on this thread.

    For work outside any network (matrix products on tensors). A no-op when no ledger records
    (the counter's overhead then never touches a run's timing). Network calls inside the block
    are counted here, not recorded as passes.
    """
    ledger: PassLedger | None = getattr(_ACTIVE, "ledger", None)
    if ledger is None or threading.get_ident() != ledger._thread:
        yield
        return
    counter = flop_counter()
    ledger._paused += 1
    try:
        with counter:
            yield
    finally:
        ledger._paused -= 1
        ledger.direct_flops += float(counter.get_total_flops())
