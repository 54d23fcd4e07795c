"""Fused BatchNorm + elu / silu / gelu (+ residual) kernels for CPU: the kernels of
:mod:`.numba_act_kernels` built for the transcendental activations (loop kinds 3, 4 and 5,
one loop copy each). A module of their own because a module's kernels are compiled together
on first use (see ``numba_entry``): users of identity, relu and leaky_relu compile none of
these loops, and users of these none of theirs."""

from __future__ import annotations

from .numba_act_kernels import PACKED, kernels

__all__ = ["PACKED", "backward_act", "forward_act"]

forward_act, backward_act = kernels((3, 4, 5))
