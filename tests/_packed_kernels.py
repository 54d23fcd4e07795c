"""A test kernel in the packed-call protocol (batchnorm.backends.numba_entry): marks each
unit it runs, and fails in the unit ``fail_at`` (a failure inside compiled code, which the
host must turn into an exception instead of a hang or a silent result)."""

from numba import njit

from batchnorm.backends.numba_kernels import _claim, _unit_done

PACKED = {"mark": "s1 i"}


@njit
def mark(out, fail_at, phase, units, ctl):
    n = units
    k = _claim(ctl, n)
    while k < n:
        if k == fail_at:
            raise ValueError("unit failed on purpose")
        out[k] += 1.0 + phase
        _unit_done(ctl, False)
        k = _claim(ctl, n)
