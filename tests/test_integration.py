"""The modules inside the rest of PyTorch: torch.jit.trace, forward-mode AD, torch.func
transforms, torch.compile(fullgraph=True, dynamic=True) and torch.export of BatchNormAct,
each compared with torch.nn used the same way. (Where the fused kernels cannot take part the
layer runs as torch ops or through the custom ops; the numbers must not change.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import batchnorm
from helpers import TOLERANCES, assert_close, backend_params, make_input

BACKENDS = backend_params()
TOL = TOLERANCES[torch.float32]


def _pair(backend: str, channels_last: bool = False, act: bool = False):
    """Conv + our BN (or BatchNormAct2d, relu) and the same with torch.nn, equal weights."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                         batchnorm.BatchNormAct2d(4, backend=backend) if act
                         else batchnorm.BatchNorm2d(4, backend=backend))
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                           *([nn.ReLU()] if act else []))
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for m in (ours, theirs):
            m[1].running_mean.fill_(0.3)
            m[1].running_var.fill_(2.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ours.to(memory_format=fmt), theirs.to(memory_format=fmt)


def _x(shape=(2, 3, 5, 5), channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    return make_input(shape, channels_last=channels_last, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("act", [False, True], ids=["bn", "act"])
def test_jit_trace_matches_eager(backend, channels_last, grad, act):
    """The traced graph must contain the layer (a kernel writing through raw pointers left
    only the output's allocation in it: uninitialized memory on other inputs)."""
    ours, theirs = _pair(backend, channels_last, act)
    ours.eval()
    theirs.eval()
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(ours, (_x(channels_last=channels_last),), check_trace=False)
    with torch.no_grad():
        x2 = _x(channels_last=channels_last, seed=1)
        assert_close(traced(x2), theirs(x2), *TOL, "traced on a new input")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("act", [False, True], ids=["bn", "act"])
def test_forward_mode_ad_tangents(backend, training, grad, act):
    ours, theirs = _pair(backend, act=act)
    x, t = _x(), _x(seed=3)
    out = []
    for model in (ours, theirs):
        model.train(training)
        with torch.set_grad_enabled(grad), forward_ad.dual_level():
            y = model(forward_ad.make_dual(x, t))
            primal, tangent = forward_ad.unpack_dual(y)
        assert tangent is not None, "the tangent was dropped"
        out.append((primal, tangent))
    assert_close(out[0][0], out[1][0], *TOL, "primal")
    assert_close(out[0][1], out[1][1], *TOL, "tangent")
    assert_close(ours[1].running_mean, theirs[1].running_mean, *TOL, "running_mean")
    assert_close(ours[1].running_var, theirs[1].running_var, *TOL, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_in_eval(backend):
    """grad, vmap (channels-last samples too) and per-sample gradients as with torch.nn."""
    ours, theirs = _pair(backend)
    ours.eval()
    theirs.eval()
    x = _x((4, 3, 5, 5))
    results = []
    for model in (ours, theirs):
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())

        def loss(p, sample, model=model, buffers=buffers):
            out = torch.func.functional_call(model, (p, buffers), (sample.unsqueeze(0),))
            return out.square().sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        with torch.no_grad():
            mapped = torch.func.vmap(lambda s, model=model: model(s.unsqueeze(0)))(
                x.contiguous(memory_format=torch.channels_last))
        results.append((per_sample["1.weight"], per_sample["0.weight"], mapped))
    for got, want, name in zip(results[0], results[1], ("dweight", "dconv", "vmap")):
        assert_close(got, want, 1e-4, 1e-4, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_dynamic_from_a_fresh_process_state(backend, training):
    """fullgraph=True with dynamic shapes, the backend resolved while tracing."""
    torch._dynamo.reset()
    ours, theirs = _pair(backend)
    ours.train(training)
    theirs.train(training)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (2, 5):
        x = _x((n, 3, 5, 5), seed=n)
        assert_close(compiled(x), theirs(x), *TOL, f"batch {n}")
    assert_close(ours[1].running_var, theirs[1].running_var, *TOL, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_batchnorm_act(backend, strict):
    ours, theirs = _pair(backend, act=True)
    ours.eval()
    theirs.eval()
    exported = torch.export.export(ours, (_x(),), strict=strict)
    x2 = _x(seed=5)
    assert_close(exported.module()(x2), theirs(x2), *TOL, "exported BatchNormAct2d")


def test_compiled_model_follows_the_default_backend_and_the_size():
    """The backend is chosen while tracing with guards, not frozen: set_backend between
    calls, and "auto" across sizes (dynamic shapes), reach the compiled model as eagerly."""
    from batchnorm import ops
    from batchnorm.backends import resolve_backend, set_backend

    seen = []
    original = ops.get_backend

    def spy(name):
        seen.append(name)
        return original(name)

    torch._dynamo.reset()
    m = batchnorm.BatchNorm2d(8)  # backend=None: the process default
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        ops.get_backend = spy
        with torch.no_grad():
            for x in (torch.randn(2, 8, 4, 4), torch.randn(64, 8, 32, 32)):
                compiled(x)
                assert seen[-1] == resolve_backend(None, x, True), x.shape
            set_backend("torch")
            compiled(torch.randn(3, 8, 4, 4))
            assert seen[-1] == "torch"
    finally:
        ops.get_backend = original
        set_backend(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [False, True], ids=["bn", "act"])
def test_torch_func_over_the_parameters_alone(backend, act):
    """torch.func.grad over the parameters of a first layer (the input is a plain tensor)."""
    ours, theirs = _pair(backend, act=act)
    ours.eval()
    theirs.eval()
    x = _x()
    grads = []
    for model in (ours, theirs):
        params = dict(model.named_parameters())

        def loss(p, model=model):
            return torch.func.functional_call(model, p, (x,)).square().sum()

        grads.append(torch.func.grad(loss)(params))
    for key in grads[1]:
        assert_close(grads[0][key], grads[1][key], 1e-4, 1e-4, key)


@pytest.mark.parametrize("how", ["fullgraph", "export", "export-strict", "jit.trace"])
def test_in_place_act_with_a_residual_compiles_and_exports(how):
    """Traced, in-place mode computes out of place (no memory checks on fake tensors)."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = batchnorm.BatchNormAct2d(4, activation="leaky_relu", inplace=True)

        def forward(self, x):
            return self.bn(self.conv(x), x)

    block = Block().eval()
    x = _x((2, 4, 5, 5))
    with torch.no_grad():
        want = block(x.clone())
        if how == "fullgraph":
            torch._dynamo.reset()
            got = torch.compile(block, backend="aot_eager", fullgraph=True)(x.clone())
        elif how.startswith("export"):
            got = torch.export.export(block, (x,), strict=how == "export-strict").module()(x)
        else:
            got = torch.jit.trace(block, (x.clone(),), check_trace=False)(x.clone())
    assert_close(got, want, *TOL, how)


# ---- torch.fx.symbolic_trace: our layers are leaves, as torch.nn's are ------------------------

class _Block(nn.Module):
    """conv -> BN -> relu -> conv -> BN + residual (the block input) -> relu, in torch.nn or
    ours (BatchNormAct2d for the second BN)."""

    def __init__(self, ours: bool, backend: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        # no conv biases: a BN right after one makes its gradient exactly 0 (rounding noise)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        if ours:
            self.bn1 = batchnorm.BatchNorm2d(3, momentum=None, backend=backend)
            self.bn2 = batchnorm.BatchNormAct2d(3, backend=backend)
        else:
            self.bn1 = nn.BatchNorm2d(3, momentum=None)
            self.bn2 = nn.BatchNorm2d(3)
        self.ours = ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        if self.ours:
            return self.bn2(y, residual=x)
        return torch.relu(self.bn2(y) + x)


def _train_like_torch(model: nn.Module, theirs: nn.Module, steps: int = 3) -> None:
    """``steps`` training steps of ``model`` and of torch.nn's ``theirs`` on the same inputs:
    outputs, input and parameter gradients, then every state_dict entry."""
    for step in range(steps):
        x = _x((4, 3, 5, 5), seed=step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = model(x), theirs(x2)
        assert_close(y, y2, *TOL, f"step {step} output")
        y.square().sum().backward()
        y2.square().sum().backward()
        assert_close(x.grad, x2.grad, *TOL, f"step {step} input gradient")
    theirs_params = dict(theirs.named_parameters())
    assert set(dict(model.named_parameters())) == set(theirs_params)
    for name, p in model.named_parameters():
        assert_close(p.grad, theirs_params[name].grad, *TOL, f"{name} gradient")
    for name, t in theirs.state_dict().items():
        assert_close(model.state_dict()[name], t, *TOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_symbolic_trace_keeps_the_layers_as_leaves(backend):
    """One call_module node per layer (with the residual as its second argument), and the
    graph module trains like torch.nn: outputs, gradients, running buffers and the
    cumulative-average counter over three steps (momentum=None must not be baked in)."""
    ours, theirs = _Block(True, backend), _Block(False)
    theirs.load_state_dict(ours.state_dict())
    gm = torch.fx.symbolic_trace(ours)
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert set(calls) == {"conv1", "bn1", "conv2", "bn2"}
    assert [a.name for a in calls["bn2"].args] == ["conv2", "x"]
    _train_like_torch(gm, theirs)
    assert int(gm.bn1.num_batches_tracked) == 3
    gm.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(gm(_x((4, 3, 5, 5), seed=9)), theirs(_x((4, 3, 5, 5), seed=9)), *TOL, "eval")


@pytest.mark.parametrize("make", [
    lambda: batchnorm.FrozenBatchNorm2d(3),
    lambda: batchnorm.FrozenBatchNormAct.from_batchnorm(batchnorm.BatchNormAct2d(3)),
    lambda: batchnorm.SyncBatchNorm(3),
    lambda: batchnorm.SyncBatchNormAct(3, activation="elu"),
    lambda: batchnorm.BatchNorm(3),
], ids=["frozen", "frozen_act", "sync", "sync_act", "any_rank"])
def test_fx_symbolic_trace_of_the_other_layers(make):
    """Frozen and Sync layers (the latter without a process group) are leaves too, and the
    traced graph computes what the layer does."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), make())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    x = _x((2, 3, 4, 4))
    with torch.no_grad():
        assert_close(gm(x), model(x), 0.0, 0.0, "traced vs eager")


def test_fx_symbolic_trace_with_a_tracer_that_traces_through_everything():
    """A tracer that keeps no module as a leaf (as some graph tools do) still gets one node for
    our layer: its forward cannot be traced through."""

    class Through(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return False

    model = nn.Sequential(nn.Linear(3, 3), batchnorm.BatchNorm1d(3)).eval()
    gm = torch.fx.GraphModule(model, Through().trace(model))
    ops = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert ("call_module", "1") in ops and ("call_module", "0") not in ops  # Linear traced in
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert_close(gm(x), model(x), 0.0, 0.0, "traced vs eager")


def test_fx_symbolic_trace_of_a_layer_as_the_root_says_why():
    with pytest.raises(torch.fx.proxy.TraceError, match=r"cannot be the root.*Sequential"):
        torch.fx.symbolic_trace(batchnorm.BatchNorm2d(3))


# ---- torch.jit.script: the layers compile to torch.nn's BatchNorm step on ATen -----------------

# torch 2.13 deprecates TorchScript in favour of torch.compile/torch.export; models still use it
_JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

@_JIT_DEPRECATED
@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_script_trains_like_torch_nn_and_round_trips(backend):
    """A scripted block (BatchNorm2d with momentum=None, BatchNormAct2d with a residual)
    trains as torch.nn's does; saved and loaded, it computes the same in eval; scripting
    leaves the eager model's layers (and their backend) as they were."""
    ours, theirs = _Block(True, backend), _Block(False)
    theirs.load_state_dict(ours.state_dict())
    scripted = torch.jit.script(ours)
    assert type(ours.bn1) is batchnorm.BatchNorm2d and ours.bn1.backend == backend
    _train_like_torch(scripted, theirs)
    assert int(ours.bn1.num_batches_tracked) == 3  # the scripted layers share ours' tensors
    scripted.eval()
    theirs.eval()
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        x = _x((4, 3, 5, 5), seed=9)
        assert_close(loaded(x), theirs(x), *TOL, "loaded, eval")
        assert_close(scripted(x), ours.eval()(x), *TOL, "scripted vs eager, eval")


@_JIT_DEPRECATED
@pytest.mark.parametrize("make", [
    lambda: batchnorm.FrozenBatchNorm2d(3),
    lambda: batchnorm.FrozenBatchNormAct.from_batchnorm(batchnorm.BatchNormAct2d(3)),
    lambda: batchnorm.SyncBatchNorm(3),
    lambda: batchnorm.SyncBatchNormAct(3, activation="elu"),
    lambda: batchnorm.BatchNorm2d(3, affine=False),
    lambda: batchnorm.BatchNorm2d(3, bias=False),
    lambda: batchnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2,
                                     inplace=True),
    lambda: batchnorm.BatchNormAct2d(3, activation="gelu", track_running_stats=False),
    lambda: batchnorm.BatchNormAct2d(3, affine=False, track_running_stats=False),
    lambda: batchnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0),
    lambda: batchnorm.FrozenBatchNormAct.from_batchnorm(
        batchnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0)),
], ids=["frozen", "frozen_act", "sync", "sync_act", "no_affine", "no_bias", "inplace_act",
        "untracked_act", "no_affine_untracked", "int_slope", "frozen_int_slope"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_script_of_the_other_layers(make, training):
    """Scripted and eager layers agree (in-place BatchNormAct computes out of place when
    scripted), on fresh copies so that each trains from the same state."""
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(layer, name, None)
            if t is not None:
                t.uniform_(0.5, 1.5)
    eager = nn.Sequential(nn.Conv2d(3, 3, 1), layer).train(training)
    scripted = torch.jit.script(copy.deepcopy(eager))
    if training and isinstance(layer, batchnorm.SyncBatchNorm):
        with pytest.raises(torch.jit.Error, match="eval mode only"):
            scripted(_x((2, 3, 4, 4)))
    else:
        for seed in range(2):
            x = _x((2, 3, 4, 4), seed=seed)
            assert_close(scripted(x), eager(x), *TOL, f"call {seed}")
        for name, t in eager.state_dict().items():
            assert_close(scripted.state_dict()[name], t, *TOL, name)


@_JIT_DEPRECATED
def test_jit_script_of_any_rank_and_1d_layers():
    for layer, shape in ((batchnorm.BatchNorm(3), (2, 3, 2, 2, 2, 2)),
                         (batchnorm.BatchNorm1d(3), (4, 3)), (batchnorm.BatchNorm3d(3),
                                                              (2, 3, 2, 2, 2))):
        theirs = nn.BatchNorm1d(3) if isinstance(layer, batchnorm.BatchNorm1d) else None
        scripted = torch.jit.script(nn.Sequential(layer))
        x = _x(shape)
        expected = (theirs(x) if theirs is not None
                    else torch.nn.functional.batch_norm(x, None, None, training=True))
        assert_close(scripted(x), expected, *TOL, f"{type(layer).__name__} {shape}")


@_JIT_DEPRECATED
@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.randn(2, 3, 4)), r"expected 4D input \(got 3D input\)"),
    (lambda m: m(torch.randn(2, 5, 4, 4)), "expected input with 3 channels at dim 1"),
    (lambda m: m(torch.randn(1, 3, 1, 1)), "Expected more than 1 value per channel"),
    (lambda m: m(torch.ones(2, 3, 4, 4, dtype=torch.int64)), "floating-point input"),
    (lambda m: m(torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)),
     "residual must match the input's shape"),
    (lambda m: m(torch.randn(2, 3, 4, 4, dtype=torch.float64)), "differ in dtype"),
], ids=["rank", "channels", "one_value", "dtype", "residual", "param_dtype"])
def test_jit_script_checks_run_before_any_state_changes(call, match):
    layer = batchnorm.BatchNormAct2d(3, momentum=None)
    scripted = torch.jit.script(layer)  # a layer can be the root of torch.jit.script
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(torch.jit.Error, match=match):  # (what TorchScript raises)
        call(scripted)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed by a failed scripted call"


@_JIT_DEPRECATED
@pytest.mark.parametrize("name, value, match", [
    ("eps", 0.0, "eps must be positive during training"),
    ("momentum", 1.5, r"momentum must be a number in \[0, 1\]"),
])
def test_jit_script_rejects_bad_hyperparameters_before_the_counter_ticks(name, value, match):
    layer = batchnorm.BatchNorm2d(3)
    setattr(layer, name, value)  # (eager calls reject these too)
    scripted = torch.jit.script(layer)
    with pytest.raises(torch.jit.Error, match=match):
        scripted(torch.randn(2, 3, 4, 4))
    assert int(layer.num_batches_tracked) == 0
