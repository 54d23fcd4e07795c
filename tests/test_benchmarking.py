"""The benchmark harness runs end to end (no timing assertions: that is the benchmark's job)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from batchnorm import benchmarking
from batchnorm.benchmarking.common import fmt_table, geomean, measure, measure_turns

pytest.importorskip("numba", reason="the CPU benchmark times the numba backend")


def test_quick_cpu_benchmark_on_a_tiny_shape_prints_tables(capsys, tmp_path):
    # one thread: a tiny shape otherwise mostly times OpenMP wake-ups on a busy machine
    threads = torch.get_num_threads()
    argv = ["--device", "cpu", "--quick", "--no-compile", "--no-progress", "--threads", "1",
            "--shape", "4,8,6,6",
            "--modes", "fwd", "bwd", "fwdbwd", "eval", "--out", str(tmp_path)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(tmp_path / "bench.png")]
    assert benchmarking.main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    for mode in ("fwd", "bwd", "fwdbwd", "eval"):
        assert f"### {mode} (" in out
    assert "| case" in out and "ATen/ours" in out and "floor %" in out
    assert "x4x8x6x6 cf" in out and "x4x8x6x6 cl" in out
    assert "correctness check against ATen before timing: all ok" in out
    assert "copy bandwidth" in out and "CPU:" in out
    # which path the numba column timed, said after waiting for the C++ step's build
    from batchnorm.backends import numba_step
    assert ("numba eager step: C++" if numba_step.available()
            else "numba eager step: Python path") in out
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".md", ".csv"} <= written
    if "--plot" in argv:
        assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_device_is_routed_to_the_gpu_benchmark(capsys):
    assert benchmarking.main(["--device", "cuda", "--quick"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_helpers():
    calls = []
    times = measure(lambda i: calls.append(i), reps=5, warmup=2)
    assert len(times) == 5 and calls == list(range(7))
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    table = fmt_table(["a", "b"], [["x", 1.23456], ["yy", float("nan")]])
    assert table.splitlines()[0].startswith("| a") and "1.23" in table and "n/a" in table


def test_measure_turns_interleaves_and_shuffles():
    """One call of each statement per round, in an order shuffled per round, so that each
    statement follows each other one about equally often (an order turning by one each round
    made "b" follow "a" in two rounds of three); the j-th call of round k gets
    k * len(fns) + j (warm-up round first), so that consecutive calls rotate inputs."""
    calls = []
    fns = {n: (lambda i, n=n: calls.append((n, i))) for n in "abc"}
    reps = 300
    times, faults = measure_turns(fns, reps=reps, warmup=1, max_seconds=600.0)
    assert calls[:3] == [("a", 0), ("b", 1), ("c", 2)]
    for k in range(1, reps + 1):
        rnd = calls[3 * k:3 * k + 3]
        assert sorted(n for n, _ in rnd) == ["a", "b", "c"], rnd
        assert [i for _, i in rnd] == [3 * k, 3 * k + 1, 3 * k + 2], rnd
    follows = Counter((calls[t - 1][0], calls[t][0]) for t in range(4, len(calls)))
    # every ordered pair of different statements, and never one statement twice in a row
    assert len(follows) == 6 and all(p != q for p, q in follows), follows
    for (p, q), n in follows.items():
        # each of the two others precedes q about equally often (a turning order: 2:1)
        share = n / sum(v for (p2, q2), v in follows.items() if q2 == q)
        assert 0.4 < share < 0.6, (p, q, follows)
    assert {k: len(v) for k, v in times.items()} == {"a": reps, "b": reps, "c": reps}
    assert set(faults) == set("abc") and all(f >= 0 or f != f for f in faults.values())


def test_correctness_check_fails_on_nan(monkeypatch):
    """max() drops NaN: a kernel writing NaN must come out as a mismatch, not "ok"."""
    from batchnorm.benchmarking import cpu

    case = cpu.Case("t", "x", (4, 3, 5, 5), False)
    inp = cpu._Inputs(case, torch.float32, 1.0)
    assert cpu._check(case, inp) == "ok"
    original = cpu._bn

    def nan_ours(backend):
        f = original(backend)
        return (lambda *a: f(*a) * float("nan")) if backend == "numba" else f

    monkeypatch.setattr(cpu, "_bn", nan_ours)
    assert cpu._check(case, inp).startswith("MISMATCH")


def test_overhead_script_runs_both_modes(capsys):
    """benchmarks/bench_overhead.py end to end on a tiny shape (it prints, asserts nothing)."""
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_overhead", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        mod.main(["--shape", "4,8,6,6", "--rounds", "2", "--warm"])
        mod.main(["--shape", "4,8,6,6", "--rounds", "2", "--phases", "--threads", "1",
                  "--channels-last"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ATen/ours=" in out and "numba_kernels.forward phase 0" in out
    with pytest.raises(SystemExit):
        mod.main(["--shape", "4"])


@pytest.mark.slow
def test_first_call_lines_report_the_compile_the_load_and_the_cpp_step():
    """The bench's first-call measurement (fresh processes, empty caches, then cached): both
    lines parse, and the C++ step's readiness is reported (ready no sooner than the first
    calls returned)."""
    import re

    from batchnorm.backends import numba_step
    from batchnorm.benchmarking.cpu import _first_call

    lines = _first_call("float32")
    assert [("compile (empty cache)" in ln, "load (cached)" in ln) for ln in lines] == [
        (True, False), (False, True)]
    for ln in lines:
        m = re.search(r"included: ([0-9.]+) s \((.*)\)$", ln)
        assert m is not None, ln
        if numba_step.available():
            ready = re.search(r"ready after ([0-9.]+) s", m.group(2))
            assert ready is not None and float(ready.group(1)) >= float(m.group(1)), ln
