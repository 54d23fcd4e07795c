"""The ``batchnorm demo``: one BatchNorm life cycle, end to end, in well under a minute on CPU.

Train a small CNN with this package's BatchNorm on scikit-learn's handwritten digits (8x8
images shipped inside scikit-learn: no download), evaluate in eval mode, recalibrate the
statistics (precise BN), fold BatchNorm into the convolutions, export to ONNX and run it in
onnxruntime, then print a summary table. Each step is a function here; the CLI is thin.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nn import BatchNorm2d

__all__ = ["BasicBlock", "DemoResult", "accuracy", "load_digits_data", "make_model",
           "make_resnet_like", "measure_latency", "run_demo", "train"]


def load_digits_data(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: the 1797 digits as ``(N, 1, 8, 8)`` float32 in
    [0, 1] and int64 labels, split at random (fixed ``seed``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train_ = perm[:n_test], perm[n_test:]
    return x[train_], y[train_], x[test], y[test]


def make_model(width: int = 16) -> nn.Sequential:
    """Three Conv-BatchNorm-ReLU blocks and a linear classifier, for 8x8 inputs."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False), BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 Conv-BN with a residual add (a 1x1 Conv-BN shortcut when
    the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def make_resnet_like(
    width: int = 16, blocks: tuple[int, ...] = (1, 1, 1), num_classes: int = 10,
    in_channels: int = 3,
) -> nn.Sequential:
    """A small ResNet (stem, stages of :class:`BasicBlock` halving the resolution, pooled
    classifier) with this package's BatchNorm2d: the model of the fold benchmark and tests."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                               BatchNorm2d(width), nn.ReLU()]
    c = width
    for i, n in enumerate(blocks):
        c_out = width * 2**i
        for j in range(n):
            layers.append(BasicBlock(c, c_out, 2 if i > 0 and j == 0 else 1))
            c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 5e-3,
    progress: bool = True,
    seed: int = 0,
) -> float:
    """Train with Adam and cross-entropy; returns the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", unit="step", leave=False)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one value per channel
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of correct predictions in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was)


@torch.no_grad()
def measure_latency(model: nn.Module, x: Tensor, repeats: int = 50, warmup: int = 5) -> float:
    """Median seconds of one ``model(x)`` call (eval mode, no grad)."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class DemoResult:
    """Everything the demo measured."""

    epochs: int
    n_train: int
    n_test: int
    train_seconds: float
    accuracy_eval: float
    accuracy_recalibrated: float
    accuracy_folded: float
    latency_unfolded_ms: float
    latency_folded_ms: float
    onnx_max_abs_error: float
    onnx_prediction_agreement: float
    onnx_ops: dict[str, int]
    total_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        rows = [
            ("training", f"{self.epochs} epochs on {self.n_train} digits, "
                         f"{self.train_seconds:.1f} s"),
            ("test accuracy, eval mode (EMA statistics)", f"{self.accuracy_eval:.2%}"),
            ("test accuracy after recalibration", f"{self.accuracy_recalibrated:.2%}"),
            ("test accuracy, folded model", f"{self.accuracy_folded:.2%}"),
            ("latency unfolded (64 digits, median)", f"{self.latency_unfolded_ms:.2f} ms"),
            ("latency folded", f"{self.latency_folded_ms:.2f} ms "
                               f"({self.latency_unfolded_ms / self.latency_folded_ms:.2f}x)"),
            ("ONNX ops", ", ".join(f"{k} x{v}" for k, v in sorted(self.onnx_ops.items()))),
            ("ONNX vs torch, max abs error", f"{self.onnx_max_abs_error:.2e}"),
            ("ONNX vs torch, same predictions", f"{self.onnx_prediction_agreement:.2%}"),
            ("total time", f"{self.total_seconds:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        rule = "-" * (width + 2 + max(len(v) for _, v in rows))
        return "\n".join([rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])


def run_demo(
    epochs: int = 6,
    progress: bool = True,
    output_dir: str | Path | None = None,
    width: int = 16,
    seed: int = 0,
    log: Any = print,
    latency_repeats: int = 30,
) -> DemoResult:
    """Run the whole demo and return its measurements.

    Args:
        epochs: training epochs (about a second each on 2 CPU cores).
        progress: tqdm progress bars.
        output_dir: keep ``digits.onnx``, ``digits.safetensors`` and ``digits.json`` there
            (default: a temporary directory, removed afterwards).
        width: channels of the first convolution.
        seed: seeds the split, the initialization and the batch order.
        log: called with one line per step (None: silent).
        latency_repeats: timed calls per model (the median is reported).
    """
    from .tools import export_onnx, fold, recalibrate, save

    say = log or (lambda *_: None)
    start = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_data(seed=seed)
    model = make_model(width)
    say(f"training a {sum(p.numel() for p in model.parameters())}-parameter CNN "
        f"with batchnorm.BatchNorm2d on {len(y_tr)} digits")
    secs = train(model, x_tr, y_tr, epochs, progress=progress, seed=seed)
    acc_eval = accuracy(model, x_te, y_te)

    say("recalibrating BatchNorm statistics over the training set (precise BN)")
    batches = [x_tr[i:i + 256] for i in range(0, len(y_tr), 256)]
    recalibrate(model, batches, progress=progress)
    acc_recal = accuracy(model, x_te, y_te)

    say("folding BatchNorm into the convolutions")
    folded = fold(model)
    acc_fold = accuracy(folded, x_te, y_te)
    batch = x_te[:64]  # an inference-sized batch
    lat_unfolded = measure_latency(model, batch, latency_repeats)
    lat_folded = measure_latency(folded, batch, latency_repeats)

    say("exporting to ONNX and running it in onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = export_onnx(model, x_te, out / "digits.onnx")
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "digits.onnx"),
                                       providers=["CPUExecutionProvider"])
        ort_logits = torch.from_numpy(session.run(None, {"input": x_te.numpy()})[0])
        save(model, out / "digits.safetensors")
    with torch.no_grad():
        agree = float((ort_logits.argmax(1) == model.eval()(x_te).argmax(1)).float().mean())
    return DemoResult(
        epochs=epochs, n_train=len(y_tr), n_test=len(y_te), train_seconds=secs,
        accuracy_eval=acc_eval, accuracy_recalibrated=acc_recal, accuracy_folded=acc_fold,
        latency_unfolded_ms=lat_unfolded * 1e3, latency_folded_ms=lat_folded * 1e3,
        onnx_max_abs_error=float(report.max_abs_error or 0.0),
        onnx_prediction_agreement=agree, onnx_ops=report.op_counts,
        total_seconds=time.perf_counter() - start,
    )
