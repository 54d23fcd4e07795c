"""The C++ front door (``front`` in ``backends/numba_step.cpp``): a whole ``batch_norm`` or
``BatchNorm*d`` call in C++, checks included. Where it takes a call it must give the Python
path's bits (outputs, gradients, running buffers, the counter); every call that the Python
path treats otherwise (raises, converts, traces, transforms, gives another backend) it must
decline, so that errors, their messages and the state they leave stay the Python path's."""

from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("numba", reason="the numba backend needs numba (pip install numba)")

import batchnorm
from batchnorm.backends import eager_front, numba_step, resolve_backend
from helpers import make_input, to_channels_last

pytestmark = pytest.mark.skipif(not numba_step.available(),
                                reason="the C++ step did not build here (test_numba_step.py "
                                       "fails where a compiler is)")

C = 12
SHAPE = (6, C, 5, 4)


class _Spy:
    """Wraps the front door: counts the calls it was asked and the calls it took."""

    def __init__(self, fn):
        self.fn, self.asked, self.taken = fn, 0, 0

    def __call__(self, *args):
        self.asked += 1
        y = self.fn(*args)
        self.taken += y is not None
        return y


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(eager_front["fn"])
    monkeypatch.setitem(eager_front, "fn", s)
    return s


def _without_front(monkeypatch):
    monkeypatch.setitem(eager_front, "fn", None)


def _args(dtype=torch.float32, cl=False, affine=True, running=True):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(SHAPE, dtype, channels_last=cl)
    w = torch.rand(C, dtype=acc) + 0.5 if affine else None
    b = torch.randn(C, dtype=acc) if affine else None
    rm = torch.randn(C, dtype=acc) if running else None
    rv = torch.rand(C, dtype=acc) + 0.5 if running else None
    return x, rm, rv, w, b


def _functional_step(x, rm, rv, w, b, training, dy, **kw):
    """y, then the gradients of x, w, b that can be asked for (training), the buffers."""
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    if training:
        y = batchnorm.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], True, **kw)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    else:
        with torch.no_grad():
            y = batchnorm.batch_norm(x, rm, rv, w, b, False, **kw)
        grads = ()
    return [y, *grads, *(t for t in (rm, rv) if t is not None)]


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride(), i
        assert torch.equal(a, e), f"output {i}: max diff {(a.double() - e.double()).abs().max()}"


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(("training", "affine", "running"),
                         [(True, True, True), (True, False, True), (True, True, False),
                          (False, True, True), (False, False, True)],
                         ids=["train", "train-plain", "train-untracked", "eval", "eval-plain"])
def test_functional_calls_it_takes_give_the_python_paths_bits(monkeypatch, spy, training, cl,
                                                              dtype, affine, running):
    x, rm, rv, w, b = _args(dtype, cl, affine, running)
    dy = make_input(SHAPE, dtype, channels_last=cl, shift=0.0, scale=1.0)
    _functional_step(x, rm, rv, w, b, training, dy, backend="numba")  # makes the recipe
    before = spy.taken
    got = _functional_step(x, rm, rv, w, b, training, dy, backend="numba")
    assert spy.taken == before + 1, "the front door did not take the call"
    with monkeypatch.context() as m:
        _without_front(m)
        expected = _functional_step(x, rm, rv, w, b, training, dy, backend="numba")
    _assert_same(got, expected)


def _module_run(cls, inputs, dy, steps, front, monkeypatch, **kw):
    """``steps`` forward (+ backward in training) calls ``m(*inputs)`` of a fresh module:
    outputs, the gradients of the inputs and parameters, and the state_dict after each."""
    torch.manual_seed(1234)
    m = cls(C, backend="numba", **kw)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    out = []
    with monkeypatch.context() as mp:
        if not front:
            _without_front(mp)
        for training in steps:
            m.train(training)
            leaves = [t.detach().requires_grad_(training) for t in inputs]
            with torch.set_grad_enabled(training):  # (eval with a gradient: declined)
                y = m(*leaves)
            grads = torch.autograd.grad(y, [*leaves, *m.parameters()], dy) if training else ()
            out += [y.detach(), *grads, *m.state_dict().values()]
    return out


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False},
                                {"momentum": 0.3}], ids=["default", "plain", "untracked",
                                                         "momentum"])
def test_module_calls_give_the_python_paths_bits_and_count_once(monkeypatch, spy, cl, kw):
    x = make_input(SHAPE, channels_last=cl)
    dy = make_input(SHAPE, channels_last=cl, shift=0.0, scale=1.0)
    steps = [True, True, False, True, False, False]
    _module_run(batchnorm.BatchNorm2d, [x], dy, steps, True, monkeypatch, **kw)  # recipes
    before = spy.taken
    got = _module_run(batchnorm.BatchNorm2d, [x], dy, steps, True, monkeypatch, **kw)
    assert spy.taken - before == len(steps), "the front door did not take every call"
    expected = _module_run(batchnorm.BatchNorm2d, [x], dy, steps, False, monkeypatch, **kw)
    _assert_same(got, expected)
    if kw.get("track_running_stats", True):
        assert int(got[-1]) == steps.count(True), "num_batches_tracked"


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # (the exception is what is compared)
        return (type(exc), str(exc))


def _assert_refused_alike(monkeypatch, call, name, *state):
    """``call`` raises the same exception with the same message with the front door as
    without it, and leaves the tensors ``state`` as they were."""
    saved = [t.clone() for t in state]
    with torch.no_grad():
        got = _outcome(call)
        with monkeypatch.context() as m:
            _without_front(m)
            expected = _outcome(call)
    assert got[0] is not "ok" and got == expected, name  # noqa: F632 (identity on purpose)
    for t, before in zip(state, saved):
        assert torch.equal(t, before), f"{name}: the state changed"


def _bad_functional_calls():
    """(name, arguments of batch_norm given the valid ones) that the checks refuse."""
    meta = torch.ones(C, device="meta")
    return [
        ("weight size", lambda a: {**a, "weight": torch.ones(C + 1)}),
        ("weight 2-D", lambda a: {**a, "weight": torch.ones(1, C)}),
        ("weight int", lambda a: {**a, "weight": torch.ones(C, dtype=torch.int64)}),
        ("weight list", lambda a: {**a, "weight": [1.0] * C}),
        ("bias on meta", lambda a: {**a, "bias": meta}),
        ("var missing", lambda a: {**a, "running_var": None}),
        ("eval without buffers", lambda a: {**a, "training": False, "running_mean": None,
                                            "running_var": None}),
        ("eps 0 training", lambda a: {**a, "training": True, "eps": 0.0}),
        ("eps negative", lambda a: {**a, "training": False, "eps": -1e-5}),
        ("eps nan", lambda a: {**a, "eps": math.nan}),
        ("eps inf", lambda a: {**a, "eps": math.inf}),
        ("eps bool", lambda a: {**a, "eps": True}),
        ("eps str", lambda a: {**a, "eps": "1e-5"}),
        ("momentum 1.5", lambda a: {**a, "momentum": 1.5}),
        ("momentum -0.1", lambda a: {**a, "momentum": -0.1}),
        ("momentum nan", lambda a: {**a, "momentum": math.nan}),
        ("momentum None", lambda a: {**a, "momentum": None}),
        ("momentum bool", lambda a: {**a, "momentum": False}),
        ("float64 input, float32 weight",
         lambda a: {**a, "input": a["input"].double(), "running_mean": a["running_mean"].double(),
                    "running_var": a["running_var"].double()}),
        ("one value per channel",
         lambda a: {**a, "training": True, "input": a["input"][:1, :, :1, :1]}),
        ("integer input", lambda a: {**a, "input": a["input"].long()}),
        ("1-D input", lambda a: {**a, "input": a["input"][0, :, 0, 0]}),
        ("input a list", lambda a: {**a, "input": a["input"].tolist()}),
        ("unknown backend", lambda a: {**a, "backend": "numbaa"}),
    ]


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_functional_calls_raise_as_on_the_python_path(monkeypatch, spy, cl, training):
    """Each bad call next to a valid one the front door took (its recipe made): the same
    exception and message as without the front, and the buffers untouched."""
    x, rm, rv, w, b = _args(cl=cl)
    valid = {"input": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b,
             "training": training, "momentum": 0.1, "eps": 1e-5, "backend": "numba"}
    with torch.no_grad():
        batchnorm.batch_norm(**valid)
        before = spy.taken
        batchnorm.batch_norm(**valid)
    assert spy.taken == before + 1
    for name, bad in _bad_functional_calls():
        _assert_refused_alike(monkeypatch, functools.partial(batchnorm.batch_norm, **bad(valid)),
                              name, rm, rv)


def test_bad_module_calls_raise_as_on_the_python_path(monkeypatch, spy):
    x = make_input(SHAPE)
    m = batchnorm.BatchNorm2d(C, backend="numba")
    with torch.no_grad():
        m(x)
        before = spy.taken
        m(x)
    assert spy.taken == before + 1

    def attr(name, value):
        def call():
            old = getattr(m, name)
            setattr(m, name, value)
            try:
                return m(x)
            finally:
                setattr(m, name, old)
        return call

    bad = [("3-D input", lambda: m(x[:, :, 0])), ("5-D input", lambda: m(x[..., None])),
           ("channels", lambda: m(x[:, :-1])), ("eps 0", attr("eps", 0.0)),
           ("eps nan", attr("eps", math.nan)), ("momentum 2", attr("momentum", 2.0)),
           ("momentum str", attr("momentum", "0.1")),
           ("weight size", lambda: batchnorm.BatchNorm2d(C + 1, backend="numba")(x)),
           ("one value per channel", lambda: m(x[:1, :, :1, :1]))]
    for name, call in bad:
        _assert_refused_alike(monkeypatch, call, name, *m.state_dict().values())


def test_calls_the_python_path_treats_otherwise_are_declined(monkeypatch, spy):
    """Valid calls that must not run the front door's way, each next to the same call with
    its recipe made: the front declines, the result is the Python path's."""
    x, rm, rv, w, b = _args()
    valid = {"input": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b,
             "training": False, "momentum": 0.1, "eps": 1e-5, "backend": "numba"}

    class Sub(torch.Tensor):
        pass

    cases = [
        ("eval with a gradient", True, lambda a: {**a, "input": a["input"].requires_grad_()}),
        ("training as an int", False, lambda a: {**a, "training": 0}),
        ("eps a float subclass", False, lambda a: {**a, "eps": _F(1e-5)}),
        ("a Tensor subclass", False, lambda a: {**a, "input": a["input"].as_subclass(Sub)}),
        ("strided running buffer", False,
         lambda a: {**a, "running_mean": torch.stack([a["running_mean"]] * 2, 1)[:, 0]}),
        ("another backend", False, lambda a: {**a, "backend": "native"}),
        ("auto in eval (native's)", False, lambda a: {**a, "backend": "auto"}),
    ]
    batchnorm.batch_norm(**valid)
    for name, grad, make in cases:
        args = make({**valid, "input": x.detach().clone()})
        with torch.set_grad_enabled(grad):
            before = spy.taken
            got = batchnorm.batch_norm(**args)
            assert spy.taken == before, f"{name}: the front door took it"
            with monkeypatch.context() as m:
                _without_front(m)
                expected = batchnorm.batch_norm(**args)
        assert torch.equal(got.detach(), expected.detach()), name
    assert resolve_backend("auto", x, training=False) != "numba"


class _F(float):
    pass


def test_the_backend_default_reaches_the_front(monkeypatch, spy):
    x, rm, rv, w, b = _args(cl=True)
    with torch.no_grad():
        for default, taken in (("numba", 1), ("native", 0), ("auto", 1)):
            # (channels-last training: "auto" prefers numba there)
            batchnorm.set_backend(default)
            batchnorm.batch_norm(x, rm, rv, w, b, True)
            before = spy.taken
            batchnorm.batch_norm(x, rm, rv, w, b, True)
            assert spy.taken - before == taken, default
        batchnorm.set_backend(None)
        monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
        before = spy.taken
        batchnorm.batch_norm(x[:, :, :3].contiguous(), rm, rv, w, b, False)  # (new recipe)
        batchnorm.batch_norm(x[:, :, :3].contiguous(), rm, rv, w, b, False)
        assert spy.taken == before + 1, "$BATCHNORM_BACKEND"


def test_subclasses_and_cumulative_momentum_keep_the_python_path(monkeypatch, spy):
    class Wide(batchnorm.BatchNorm2d):
        def _check_input_dim(self, input):  # takes 3-D input too
            if input.dim() not in (3, 4):
                raise ValueError("3-D or 4-D")

    x = make_input(SHAPE)
    for m in (Wide(C, backend="numba"), batchnorm.BatchNorm2d(C, momentum=None,
                                                              backend="numba")):
        for _ in range(3):
            m(x)
    assert spy.taken == 0
    assert int(m.num_batches_tracked) == 3
    theirs = torch.nn.BatchNorm2d(C, momentum=None)
    for _ in range(3):
        theirs(x)
    torch.testing.assert_close(m.running_var, theirs.running_var)


def test_tracing_transforms_and_forward_ad_are_declined(spy):
    x, rm, rv, w, b = _args()
    with torch.no_grad():
        batchnorm.batch_norm(x, rm.clone(), rv.clone(), w, b, True, backend="numba")
    m = batchnorm.BatchNorm2d(C, backend="numba").eval()
    with torch.no_grad():
        m(x)
        before = spy.taken
        traced = torch.jit.trace(m, (x,), check_trace=False)
        assert spy.taken == before, "tracing took the front door"
        assert torch.equal(traced(x + 1), m(x + 1))
        assert spy.taken == before + 1, "the untraced call (m(x + 1)) did not take it"

    def one(xi):
        return batchnorm.batch_norm(xi[None], rm, rv, w, b, False, backend="numba")[0]

    before = spy.taken
    got = torch.vmap(one)(x)
    assert spy.taken == before
    torch.testing.assert_close(got, batchnorm.batch_norm(x, rm, rv, w, b, False,
                                                         backend="numba"))
    import torch.autograd.forward_ad as fwad

    before, asked = spy.taken, spy.asked
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.ones_like(x))
        y = batchnorm.batch_norm(dual, rm, rv, w, b, False, backend="numba")
        tangent = fwad.unpack_dual(y).tangent
    assert spy.asked == asked and spy.taken == before
    torch.testing.assert_close(tangent, (w / torch.sqrt(rv + 1e-5)).view(1, C, 1, 1)
                               .expand_as(x))


def test_hooks_and_parametrizations_that_compute_the_weight(monkeypatch, spy):
    """``weight_norm`` keeps the computed weight in the module's ``__dict__`` (not in
    ``_parameters``) and a parametrization swaps the module's class: both give the Python
    path's numbers, through the front door where it can see the weight."""
    from torch.nn.utils import parametrize

    x, dy = make_input(SHAPE), torch.randn(SHAPE)

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    def build(kind):
        torch.manual_seed(7)
        m = batchnorm.BatchNorm2d(C, backend="numba")
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
        if kind == "weight_norm":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # (deprecated for parametrize)
                torch.nn.utils.weight_norm(m, "weight", dim=0)
        else:
            parametrize.register_parametrization(m, "weight", Doubled())
        return m

    for kind, taken in (("weight_norm", 2), ("parametrization", 0)):
        results = []
        for front in (True, False):
            with monkeypatch.context() as mp:
                if not front:
                    _without_front(mp)
                m = build(kind)
                out = []
                numba_step.forget_recipes()  # (the first call makes the recipe)
                before = spy.taken
                for _ in range(3):
                    xi = x.detach().requires_grad_()
                    y = m(xi)
                    out += [y, *torch.autograd.grad(y, [xi, *m.parameters()], dy)]
                assert spy.taken - before == (taken if front else 0), kind
                results.append(out + list(m.state_dict().values()))
        _assert_same(*results)


def test_an_unknown_default_backend_errs_in_the_python_paths_order(monkeypatch, spy):
    x, rm, rv, w, b = _args()
    with torch.no_grad():
        batchnorm.batch_norm(x, rm, rv, w, b, False, backend="numba")
        monkeypatch.setenv("BATCHNORM_BACKEND", "numbaa")
        for name, weight in (("valid arguments", w), ("weight size", torch.ones(C + 1))):
            _assert_refused_alike(monkeypatch, functools.partial(
                batchnorm.batch_norm, x, rm, rv, weight, b, False), name, rm, rv)


# ---- BatchNorm + activation (+ residual), out of place ----------------------------------------


def _act_step(x, rm, rv, w, b, r, training, dy, **kw):
    """batch_norm_act's y, then (training) the gradients of x, w, b and the residual; the
    buffers."""
    rm, rv = rm.clone(), rv.clone()
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    if training:
        y = batchnorm.batch_norm_act(leaves[0], rm, rv, leaves[1], leaves[2], True,
                                     residual=leaves[3], **kw)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    else:
        with torch.no_grad():
            y = batchnorm.batch_norm_act(x, rm, rv, w, b, False, residual=r, **kw)
        grads = ()
    return [y, *grads, rm, rv]


def _taken_alike(monkeypatch, spy, step, *args, **kw):
    """``step(*args, **kw)`` once to make the recipe, then once through the front door (which
    must take it) and once without it: the two give the same bits; returns the first."""
    step(*args, **kw)
    before = spy.taken
    got = step(*args, **kw)
    assert spy.taken == before + 1, "the front door did not take the call"
    with monkeypatch.context() as m:
        _without_front(m)
        expected = step(*args, **kw)
    _assert_same(got, expected)
    return got


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("activation", "slope", "with_residual"),
                         [("relu", 0.01, True), ("leaky_relu", 0.2, True), ("silu", 0.01, False),
                          ("gelu", 0.01, True), ("identity", 0.01, False)])
def test_act_calls_it_takes_give_the_python_paths_bits(monkeypatch, spy, cl, training,
                                                       activation, slope, with_residual):
    x, rm, rv, w, b = _args(cl=cl)
    r = make_input(SHAPE, channels_last=cl, shift=0.0) if with_residual else None
    dy = make_input(SHAPE, channels_last=cl, shift=0.0, scale=1.0)
    kw = {"activation": activation, "negative_slope": slope, "backend": "numba"}
    _taken_alike(monkeypatch, spy, _act_step, x, rm, rv, w, b, r, training, dy, **kw)


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_act_module_calls_give_the_python_paths_bits_and_count_once(monkeypatch, spy, cl):
    x = make_input(SHAPE, channels_last=cl)
    r = make_input(SHAPE, channels_last=cl, shift=0.0)
    dy = make_input(SHAPE, channels_last=cl, shift=0.0, scale=1.0)
    steps = [True, True, False, True, False]
    kw = {"activation": "leaky_relu", "negative_slope": 0.1}
    act2d = batchnorm.BatchNormAct2d
    _module_run(act2d, [x, r], dy, steps, True, monkeypatch, **kw)  # (the recipes)
    before = spy.taken
    got = _module_run(act2d, [x, r], dy, steps, True, monkeypatch, **kw)
    assert spy.taken - before == len(steps), "the front door did not take every call"
    _assert_same(got, _module_run(act2d, [x, r], dy, steps, False, monkeypatch, **kw))
    assert int(got[-1]) == steps.count(True), "num_batches_tracked"


def test_bad_act_calls_raise_and_converted_ones_are_declined(monkeypatch, spy):
    x, rm, rv, w, b = _args()
    r = make_input(SHAPE, shift=0.0)
    valid = {"input": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b,
             "training": True, "activation": "leaky_relu", "negative_slope": 0.1,
             "residual": r, "backend": "numba"}
    with torch.no_grad():
        batchnorm.batch_norm_act(**valid)
        before = spy.taken
        batchnorm.batch_norm_act(**valid)
    assert spy.taken == before + 1
    bad = [("unknown activation", {"activation": "tanh"}),
           ("activation None", {"activation": None}),
           ("slope nan", {"negative_slope": math.nan}), ("slope bool", {"negative_slope": True}),
           ("residual shape", {"residual": r[:, :, :2]}), ("residual int", {"residual": r.long()}),
           ("residual list", {"residual": r.tolist()}),
           ("in place, not invertible", {"activation": "relu", "inplace": True}),
           ("weight size", {"weight": torch.ones(C + 1)})]
    for name, change in bad:
        _assert_refused_alike(
            monkeypatch, functools.partial(batchnorm.batch_norm_act, **{**valid, **change}),
            name, rm, rv)
    # valid calls the front leaves to the Python path: a slope the Python path converts, a
    # residual in another layout (converted), in place with a truthy non-bool
    declined = [("slope str", {"negative_slope": "0.1"}),
                ("residual channels-last", {"residual": to_channels_last(r)}),
                ("in place, inplace=1", {"inplace": 1})]
    for name, change in declined:
        results = []
        for front in (True, False):
            with torch.no_grad(), monkeypatch.context() as m:
                if not front:
                    _without_front(m)
                before = spy.taken
                args = {**valid, **change, "input": x.clone(), "running_mean": rm.clone(),
                        "running_var": rv.clone()}
                results.append([batchnorm.batch_norm_act(**args), args["running_mean"],
                                args["running_var"]])
                assert spy.taken == before, f"{name}: the front door took it"
        _assert_same(*results)


def _in_place_step(x, rm, rv, w, b, r, training, dy, **kw):
    """An in-place call on an intermediate copy of ``x``: y, whether y is that copy and its
    version, then (training) the gradients of x's leaf, w, b and r; the buffers."""
    rm, rv = rm.clone(), rv.clone()
    leaves = [t.detach().requires_grad_(training) if t is not None else None
              for t in (x, w, b, r)]
    with torch.set_grad_enabled(training):
        x0 = leaves[0] * 1.0
        y = batchnorm.batch_norm_act(x0, rm, rv, leaves[1], leaves[2], training,
                                     residual=leaves[3], inplace=True, **kw)
        same = [torch.tensor(y is x0), torch.tensor(x0._version)]
        grads = (torch.autograd.grad(y, [t for t in leaves if t is not None], dy) if training
                 else ())
    return [y.detach(), *same, *grads, rm, rv]


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("activation", "slope", "with_residual"),
                         [("leaky_relu", 0.2, True), ("elu", 0.01, False),
                          ("identity", 0.01, True)])
def test_in_place_act_calls_it_takes_give_the_python_paths_bits(monkeypatch, spy, cl, training,
                                                                activation, slope,
                                                                with_residual):
    x, rm, rv, w, b = _args(cl=cl)
    # weights the in-place kernels replace (|w| < 1e-6, signed zeros) and keep (1e-6, NaN-free)
    w[:6] = torch.tensor([0.0, -0.0, 1e-7, -5e-7, 1e-6, -1e-6])
    r = make_input(SHAPE, channels_last=cl, shift=0.0) if with_residual else None
    dy = make_input(SHAPE, channels_last=cl, shift=0.0, scale=1.0)
    kw = {"activation": activation, "negative_slope": slope, "backend": "numba"}
    got = _taken_alike(monkeypatch, spy, _in_place_step, x, rm, rv, w, b, r, training, dy,
                       **kw)
    assert bool(got[1]), "the output is not the input"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place_calls_in_inference_mode_give_the_python_paths_bits(monkeypatch, spy,
                                                                     training):
    x, rm, rv, w, b = _args()
    r = make_input(SHAPE, shift=0.0)
    kw = {"activation": "elu", "residual": r, "inplace": True, "backend": "numba"}

    def call():
        args = [rm.clone(), rv.clone(), w, b, training]
        with torch.inference_mode():
            x0 = x.clone()
            y = batchnorm.batch_norm_act(x0, *args, **kw)
            assert y is x0 and x0.is_inference()
        return [y, args[0], args[1]]

    _taken_alike(monkeypatch, spy, call)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_in_place_module_calls_give_the_python_paths_bits(monkeypatch, spy, dtype):
    x = make_input(SHAPE, dtype)
    r = make_input(SHAPE, dtype, shift=0.0)
    dy = make_input(SHAPE, dtype, shift=0.0, scale=1.0)

    def run(front):
        torch.manual_seed(0)
        m = batchnorm.BatchNormAct2d(C, activation="leaky_relu", negative_slope=0.1,
                                     inplace=True, backend="numba", dtype=dtype)
        with torch.no_grad():
            m.weight.uniform_(-1.0, 1.0)
            m.weight[:3] = torch.tensor([0.0, 1e-8, -1e-8])
        out = []
        with monkeypatch.context() as mp:
            if not front:
                _without_front(mp)
            for training in (True, True, False, True):
                m.train(training)
                leaves = [t.detach().requires_grad_(training) for t in (x, r)]
                with torch.set_grad_enabled(training):
                    y = m(leaves[0] * 1.0, leaves[1])
                grads = (torch.autograd.grad(y, [*leaves, *m.parameters()], dy) if training
                         else ())
                out += [y.detach(), *grads, *m.state_dict().values()]
        return out

    run(True)  # (the recipes)
    before = spy.taken
    got = run(True)
    assert spy.taken - before == 4, "the front door did not take every call"
    _assert_same(got, run(False))
    assert int(got[-1]) == 3, "num_batches_tracked"


def test_in_place_calls_the_python_path_refuses_or_looks_at_closer(monkeypatch, spy):
    """What check_act_args refuses in place, the front door declines before any state
    changes (the same error either way); what it checks more closely (views) it leaves to
    that path, which gives the same result."""
    x, rm, rv, w, b = _args()
    r = make_input(SHAPE, shift=0.0)
    valid = {"running_mean": rm, "running_var": rv, "weight": w, "bias": b, "training": True,
             "activation": "leaky_relu", "negative_slope": 0.1, "residual": r,
             "backend": "numba", "inplace": True}
    batchnorm.batch_norm_act(x.clone(), **valid)  # (the recipe)
    before = spy.taken
    batchnorm.batch_norm_act(x.clone(), **valid)
    assert spy.taken == before + 1
    leaf = x.clone().requires_grad_()
    with torch.inference_mode():
        inference = x.clone()
    refused = [
        ("leaf that requires grad", lambda: {"input": leaf}),
        ("view of a leaf that requires grad", lambda: {"input": leaf.view(SHAPE)}),
        ("inference tensor outside inference mode", lambda: {"input": inference}),
        ("expanded", lambda: {"input": x[:1].expand(SHAPE),
                              "residual": r[:1].expand(SHAPE)}),
        ("residual is the input", lambda: (lambda t: {"input": t, "residual": t})(x.clone())),
        ("residual overlaps the input",
         lambda: (lambda t: {"input": t[:6], "residual": t[1:7]})(
             make_input((7, C, 5, 4), shift=0.0))),
        ("relu", lambda: {"input": x.clone(), "activation": "relu"}),
        ("slope 0", lambda: {"input": x.clone(), "negative_slope": 0.0}),
    ]
    for name, change in refused:
        def call(change=change):
            with torch.enable_grad():
                return batchnorm.batch_norm_act(**{**valid, **change()})
        _assert_refused_alike(monkeypatch, call, name, rm, rv)
    # a view of an intermediate tensor: the Python path's (and the same result)
    def view_step():
        args = {**valid, "running_mean": rm.clone(), "running_var": rv.clone()}
        source = x.clone().requires_grad_()
        y = batchnorm.batch_norm_act((source * 1.0).view(SHAPE), **args)
        return [y.detach(), args["running_mean"], args["running_var"],
                *torch.autograd.grad(y.sum(), source)]

    _declined_alike(monkeypatch, spy, view_step, "a view")


def _declined_alike(monkeypatch, spy, step, what):
    """``step()`` with the front door and without it: the front door must not take it, and
    both give the same bits."""
    results = []
    for front in (True, False):
        with monkeypatch.context() as m:
            if not front:
                _without_front(m)
            before = spy.taken
            results.append(step())
            assert spy.taken == before, f"the front door took {what}"
    _assert_same(*results)


def test_act_eval_with_a_residual_that_needs_a_gradient_keeps_autograd(monkeypatch, spy):
    x, rm, rv, w, b = _args()
    r = make_input(SHAPE, shift=0.0)
    dy = make_input(SHAPE, shift=0.0, scale=1.0)
    with torch.no_grad():
        batchnorm.batch_norm_act(x, rm, rv, w, b, False, residual=r, backend="numba")
    def step():
        ri = r.clone().requires_grad_()
        y = batchnorm.batch_norm_act(x, rm, rv, w, b, False, residual=ri, backend="numba")
        return list(torch.autograd.grad(y, ri, dy))

    _declined_alike(monkeypatch, spy, step, "an eval call that needs a gradient")
