"""``torch.fx.symbolic_trace`` support: this package's layers are recorded as leaves.

torch.fx's default tracer keeps the layers of ``torch.nn`` as leaves (one ``call_module``
node each, run as the module itself when the graph runs) and traces through every other
module's ``forward``. Ours cannot be traced through: they check shapes and pick a backend
with Python control flow, and their training step has side effects (the running buffers,
``num_batches_tracked``, a momentum that changes with it when it is None) that a graph of
baked-in values would get wrong. So when a forward receives an ``fx.Proxy`` it records the
same ``call_module`` node that a ``torch.nn.BatchNorm2d`` gets, through the tracer that made
the proxy (the default one, torchvision's feature extractors, or any other ``fx.Tracer``
subclass), and the graph calls the real layer at run time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def fx_leaf(module: torch.nn.Module, *args: Any) -> fx.Proxy | None:
    """The Proxy of a ``call_module`` node for ``module(*args)`` when an argument is an
    ``fx.Proxy`` (``module`` is being symbolically traced), else None (a normal call).

    Args:
        module: the layer whose ``forward`` was called.
        args: the forward's arguments, in order (trailing Nones are left out of the node,
            so that ``layer(x)`` reads as written rather than ``layer(x, None)``).

    Raises:
        torch.fx.proxy.TraceError: ``module`` is the root of the trace: a graph cannot call
            its own root as a leaf (``torch.nn.BatchNorm2d`` cannot be traced as a root
            either); trace a model that contains it.
    """
    # (a plain loop: every forward runs this, and a generator costs two more frames)
    for proxy in args:
        if isinstance(proxy, fx.Proxy):
            break
    else:
        return None
    tracer = proxy.tracer
    if module is getattr(tracer, "root", None):
        raise fx.proxy.TraceError(
            f"{type(module).__name__} cannot be the root of torch.fx.symbolic_trace: it is "
            "recorded as a leaf (one call_module node, as torch.nn's BatchNorm layers are), "
            "and a graph cannot call its own root; trace a module that contains it "
            "(torch.nn.Sequential(layer), say)")
    while args and args[-1] is None:
        args = args[:-1]
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
