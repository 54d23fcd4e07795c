"""Precise BatchNorm: re-estimate every BatchNorm layer's population statistics over data.

The running statistics of a trained model are an exponential moving average over the last
few hundred batches of training, taken while the weights were still changing. Replacing them
with the exact mean and variance of each layer's input over 1e3 to 1e4 samples with the final
weights ("precise BN", Wu & Johnson 2021; fvcore's ``update_bn_stats``) gives better and more
stable eval accuracy.

Per channel, every value of the data counts once, whatever the batch size: per-batch
``(count, mean, M2)`` are merged with Chan's formula (in float64), then
``running_mean = mean`` and ``running_var = M2 / (n - 1)`` (the unbiased variance over the
total count ``n``, PyTorch's convention for ``running_var``).

Which statistics do the BatchNorm layers use while the data flows? Two modes:

* ``mode="exact"`` (default): every BatchNorm stays in eval mode and the layers are measured
  one by one in call order. While layer ``k`` is measured, layers ``0..k-1`` already hold
  their new statistics, so layer ``k`` sees exactly the input it will see at inference. The
  result equals the statistics of each layer's eval-time input over the batches the passes
  yield and does not depend on how the data is split into batches (batches of one sample
  work too). Costs one pass over ``data`` per layer; each pass stops right after the measured
  layer, so about L/2 full forward passes for L layers.

  Each pass iterates ``data`` anew, so the layers share one data set only when every pass
  yields the same samples: a DataLoader with ``shuffle=False`` and deterministic transforms.
  A shuffling DataLoader (``RandomSampler``, ``SubsetRandomSampler``,
  ``WeightedRandomSampler``) gives a warning: with ``num_batches``, ``drop_last`` or sampling
  with replacement each layer is then measured on a different random subset, and random
  augmentation differs between passes in any case. A pass that yields no batch after the
  first one did raises (the data is not re-iterable).

  A layer called more than once per forward (weights shared between branches or steps) is
  measured over all its calls, with a warning: its statistics are exact only when none of its
  calls' inputs depends on the statistics of itself or of a BatchNorm layer first called
  after it (those still hold their old statistics while it is measured). ``a(x1) + a(x2)``
  with inputs independent of BatchNorm statistics is exact; ``a(a(x))`` is not and has no
  single-pass answer (the second call's input depends on ``a``'s own statistics, so the result
  depends on the old running statistics).
* ``mode="batch"``: one pass with every BatchNorm normalizing with batch statistics, as in
  training (fvcore, ``torch.optim.swa_utils.update_bn``). A layer's input then depends on the
  batch statistics of the layers before it, hence (slightly) on the batch size; the first
  layer's statistics are still exact. Use it for large models where L passes cost too much;
  like training, it needs more than one value per channel in every batch.

Only BatchNorm layers change mode, and only during the call: dropout and every other layer
keep theirs (the model is not put in ``train()``). In exact mode a layer's running buffers are
written as soon as it is measured (the layers after it must see its new statistics); in batch
mode all are written after the pass. Momentum (set to 0 during the passes so that a forward
never moves the buffers), ``num_batches_tracked`` and the training flags are restored
afterwards. If anything raises during the call (the data, the model, an interrupt), every
BatchNorm layer's ``running_mean``, ``running_var``, ``num_batches_tracked``, momentum and
training flags are put back exactly (bit for bit) as they were before the call: the model is
either fully recalibrated or unchanged, never a mix of new and old statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from ..backends.base import acc_dtype, chan_combine, reduce_dims
from ._modules import device_of

__all__ = ["recalibrate"]

_Stats = tuple[int, Tensor, Tensor]  # count, mean, M2 (float64, per channel)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the measured layer has seen its input."""


def _batch_stats(x: Tensor) -> _Stats:
    count = x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0
    if count == 0:
        return 0, x.new_zeros(0, dtype=torch.float64), x.new_zeros(0, dtype=torch.float64)
    var, mean = torch.var_mean(x.detach().to(acc_dtype(x)), dim=reduce_dims(x), correction=0)
    return count, mean.double(), var.double() * count


def _merge(acc: _Stats | None, part: _Stats) -> _Stats:
    if part[0] == 0:
        return acc if acc is not None else part
    if acc is None or acc[0] == 0:
        return part
    counts = torch.tensor([acc[0], part[0]], dtype=torch.float64, device=part[1].device)
    _, mean, m2 = chan_combine(
        counts, torch.stack([acc[1], part[1]]), torch.stack([acc[2], part[2]])
    )
    return acc[0] + part[0], mean, m2


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """``model(x)`` for a tensor, ``model(batch[0])`` for a tuple/list (inputs, targets, ...),
    ``model(**batch)`` for a dict; tensors are moved to the model's device."""
    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, Tensor) else v

    if isinstance(batch, Tensor):
        return model(move(batch))
    if isinstance(batch, (tuple, list)):
        return model(move(batch[0]))
    if isinstance(batch, dict):
        return model(**{k: move(v) for k, v in batch.items()})
    return model(batch)


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    mode: str = "exact",
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm in ``model`` over ``data``.

    Args:
        model: the model, in any mode; modified in place and returned.
        data: batches: tensors, ``(inputs, targets, ...)`` tuples or dicts of keyword
            arguments (see ``forward``). ``mode="exact"`` iterates it once per layer, so it
            must be re-iterable (a list, a DataLoader), not a one-shot iterator.
        num_batches: use only the first ``num_batches`` batches (None: all).
        progress: show a tqdm progress bar (when tqdm is installed).
        mode: ``"exact"`` (eval-time statistics, batch-split invariant, one pass per layer)
            or ``"batch"`` (one pass with batch statistics, as in training); see the module
            docstring.
        forward: ``forward(model, batch)`` runs one batch (default: see above).

    Affected layers: every ``_BatchNorm`` (ours, torch.nn's, SyncBatchNorm, subclasses) that
    tracks running statistics. Frozen layers and layers never reached by the data are left as
    they are (the latter with a warning).
    """
    if mode not in ("exact", "batch"):
        raise ValueError(f"mode must be 'exact' or 'batch', got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)
              and m.track_running_stats and m.running_mean is not None]
    if not layers:
        return model
    # Judged by type, not by ``iter(data) is data``: that probe would open an iterator never
    # used (a DataLoader with workers would start them for nothing).
    if mode == "exact" and len(layers) > 1 and isinstance(data, Iterator):
        raise TypeError(
            "recalibrate(mode='exact') makes one pass over the data per BatchNorm layer, so "
            "data must be re-iterable (a list or a DataLoader, not a generator or iterator); "
            "or use mode='batch'"
        )
    if mode == "exact" and len(layers) > 1:
        shuffle = _shuffle_warning(data, num_batches)
        if shuffle is not None:
            warnings.warn(shuffle, stacklevel=2)
    device = device_of(model)
    run = forward or (lambda m, b: _default_forward(m, b, device))
    # Everything this function changes, copied before the first change: restored as it was
    # on success (all but the running statistics) and on any exception (all of it).
    flags = {sub: sub.training for m in layers for sub in m.modules()}
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0  # a forward never moves the buffers; only _apply writes them
            # exact: eval throughout (a layer's own normalization never matters for its
            # statistics; upstream layers are already recalibrated); batch: batch statistics.
            m.train(mode == "batch")
        with torch.no_grad():
            _run(model, layers, data, num_batches, progress, mode, run)
    except BaseException:
        # Exact mode has written the layers measured so far: put them back, so that a failed
        # call leaves no mix of new and old statistics.
        with torch.no_grad():
            for m, (_, mean, var, _) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        raise
    finally:
        for sub, training in flags.items():
            sub.training = training
        for m, (momentum, _, _, nbt) in zip(layers, saved):
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    return model


_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _shuffle_warning(data: object, num_batches: int | None) -> str | None:
    """The warning for a DataLoader that draws a new random order on every iteration, or None.

    Exact mode iterates ``data`` once per layer, so such a loader gives each pass different
    batches. The exact statistics do not depend on the batching, so the warning says a
    different subset only where the passes can cover different samples (``num_batches``
    below the loader's length, ``drop_last`` with a partial last batch, sampling with
    replacement, ``num_samples`` other than the data set's size); otherwise only random
    augmentation can make the passes differ.

    Args:
        data: the ``data`` argument of ``recalibrate``.
        num_batches: the ``num_batches`` argument of ``recalibrate``.
    """
    if not isinstance(data, DataLoader):
        return None
    sampler = next((s for s in (data.sampler, getattr(data.batch_sampler, "sampler", None))
                    if isinstance(s, _RANDOM_SAMPLERS)), None)
    if sampler is None:
        return None
    reasons = []
    try:
        n_batches: int | None = len(data)
    except TypeError:
        n_batches = None
    if num_batches is not None and (n_batches is None or num_batches < n_batches):
        reasons.append(f"num_batches={num_batches} takes the first batches of a new order")
    if data.drop_last and data.batch_size and len(sampler) % data.batch_size:  # type: ignore[arg-type]
        reasons.append("drop_last drops a different partial batch")
    if getattr(sampler, "replacement", False):
        reasons.append("the sampler draws with replacement")
    elif isinstance(sampler, RandomSampler) and len(sampler) != len(sampler.data_source):  # type: ignore[arg-type]
        reasons.append(f"the sampler draws {len(sampler)} samples from a data set of "
                       f"{len(sampler.data_source)}")  # type: ignore[arg-type]
    head = (f"recalibrate(mode='exact') iterates data once per BatchNorm layer and the "
            f"DataLoader's {type(sampler).__name__} draws a new random order on every pass")
    tail = ("; use a DataLoader with shuffle=False (and deterministic transforms) for the "
            "same samples in every pass, or mode='batch' (a single pass)")
    if reasons:
        return (f"{head}, so each BatchNorm layer is measured on a different random subset of "
                f"the data ({'; '.join(reasons)}){tail}")
    return (f"{head}: every pass covers the same samples (exact statistics do not depend on "
            f"their order or batching), but random data augmentation, if any, differs between "
            f"passes{tail}")


def _run(
    model: nn.Module,
    layers: list[nn.Module],
    data: Iterable[Any],
    num_batches: int | None,
    progress: bool,
    mode: str,
    run: Callable[[nn.Module, Any], Any],
) -> None:
    index = {id(m): i for i, m in enumerate(layers)}
    stats: dict[int, _Stats] = {}
    order: list[int] = []  # layers by first call in the first pass
    calls: dict[int, int] = {}  # most calls per forward seen in the first pass
    current: dict[int, int] = {}  # calls in the current forward of the first pass
    target: int | None = None  # exact mode after the first pass: the layer being measured
    seen = 0  # target calls in the current forward

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal seen
        i = index[id(module)]
        if target is None:  # first pass: measure everyone, record the call order
            if i not in calls and i not in current:
                order.append(i)
            current[i] = current.get(i, 0) + 1
            stats[i] = _merge(stats.get(i), _batch_stats(args[0]))
        elif i == target:
            stats[i] = _merge(stats.get(i), _batch_stats(args[0]))
            seen += 1
            if seen == calls[i]:
                raise _Stop

    n_total = _length(data, num_batches)
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    passes = len(layers) if mode == "exact" else 1
    bar = _progress_bar(progress, None if n_total is None else n_total * passes)
    first_pass = 0  # batches the first pass yielded
    try:
        for batch in _batches(data, num_batches):
            current.clear()
            run(model, batch)
            for i, c in current.items():
                calls[i] = max(calls.get(i, 0), c)
            bar.update(1)
            first_pass += 1
        if mode == "batch":
            for i, st in stats.items():
                _apply(layers[i], st)
        else:
            reused = [i for i in order if calls[i] > 1]
            if reused:
                warnings.warn(_reuse_warning(model, [layers[i] for i in reused],
                                             [calls[i] for i in reused]), stacklevel=3)
            # The first-called layer has no BatchNorm upstream: its first-pass stats are exact.
            for k, i in enumerate(order):
                if k > 0:
                    stats.pop(i, None)
                    target, seen = i, 0
                    bar.set_description(f"recalibrate layer {k + 1}/{len(order)}")
                    n_pass = 0
                    for batch in _batches(data, num_batches):
                        seen = 0
                        n_pass += 1
                        try:
                            run(model, batch)
                        except _Stop:
                            pass
                        bar.update(1)
                    if n_pass == 0 and first_pass > 0:
                        # A one-shot iterable that is no Iterator (its __iter__ hands out one
                        # shared iterator): without this the layer would silently keep its
                        # old statistics behind a misleading "never reached" warning.
                        raise RuntimeError(
                            f"recalibrate(mode='exact'): pass {k + 1} over the data yielded "
                            f"no batch after the first pass yielded {first_pass}; data must "
                            f"be re-iterable, yielding the same batches on every iteration "
                            f"(or use mode='batch')"
                        )
                if i in stats:
                    _apply(layers[i], stats[i])  # later layers now see its eval-time output
    finally:
        bar.close()
        for h in handles:
            h.remove()
    missed = [i for i in range(len(layers)) if i not in stats]
    if missed:
        names = {id(m): n for n, m in model.named_modules()}
        warnings.warn(
            "recalibrate: the data never reached "
            + ", ".join(names.get(id(layers[i]), "?") for i in missed)
            + "; their statistics are unchanged",
            stacklevel=3,
        )


def _reuse_warning(model: nn.Module, layers: list[nn.Module], calls: list[int]) -> str:
    """The warning for layers called more than once per forward in exact mode.

    The calls of such a layer are all measured in the same pass, while the layer itself and
    the layers first called after it still hold their old statistics. Whether some call's
    input depends on those cannot be seen from the hooks, so the warning states the condition
    instead of claiming either way.

    Args:
        model: the model, for the layers' names.
        layers: the reused layers.
        calls: the most calls per forward of each, in the same order.
    """
    names = {id(m): n for n, m in model.named_modules()}
    which = ", ".join(f"{names.get(id(m), '?') or '(the model)'} ({c} calls)"
                      for m, c in zip(layers, calls))
    return (
        f"recalibrate(mode='exact'): BatchNorm layer(s) called more than once per forward: "
        f"{which}. Each is measured over all its calls in one pass, while it and the "
        f"BatchNorm layers first called after it still hold their old statistics, so its "
        f"new statistics equal those of its eval-time inputs only if no call's input "
        f"depends on the statistics of itself or of such a later layer (e.g. a(x1) + a(x2) "
        f"on inputs independent of BatchNorm statistics is exact); a layer applied to a "
        f"function of its own output, such as a(a(x)), has no single-pass answer and its "
        f"result depends on its old running statistics"
    )


def _apply(bn: nn.Module, st: _Stats) -> None:
    count, mean, m2 = st
    if count == 0:
        return
    with torch.no_grad():
        bn.running_mean.copy_(mean.to(bn.running_mean.device))
        bn.running_var.copy_((m2 / max(count - 1, 1)).to(bn.running_var.device))


def _batches(data: Iterable[Any], num_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def _length(data: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, num_batches)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress_bar(progress: bool, total: int | None) -> Any:
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="recalibrate", unit="batch", leave=False)
