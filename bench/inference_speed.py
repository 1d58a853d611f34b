"""Inference speed of the recognizer backends: images/s at batch 256 and single-face latency, per model.

Backends (each behind ferlab.inference.backends, so the figures include the normalisation users get):
  torch-fp32   PyTorch fp32, contiguous tensors
  torch-bf16   PyTorch with bfloat16 autocast and channels_last (ferlab's fast training path)
  onnx         ONNX Runtime, CPUExecutionProvider, the model exported by `ferlab export --onnx`
Face detection and image decoding are not included: this measures the classifier alone.

    python bench/inference_speed.py                                 # fer-resnet-s fer-mobile r002-vgg, random weights
    python bench/inference_speed.py --models runs/fer-resnet-s r002-vgg --threads 2
    OMP_NUM_THREADS=1 python bench/inference_speed.py --threads 1 --min-time 1

A model is a run directory, a .safetensors checkpoint, a shipped model name, or a registered model name
(`ferlab models`; random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ferlab.hardware import cpu_name


def load(spec: str):
    """(model, meta, weights) for a checkpoint spec, or a random-weights model for a registered name."""
    from ferlab import pretrained
    from ferlab.checkpoint import load_checkpoint
    from ferlab.inference.export import untrained_meta
    from ferlab.models import create_model, list_models

    if not Path(spec).exists() and not pretrained.is_pretrained(spec) and spec in list_models():
        model = create_model(spec).eval()
        return model, untrained_meta(spec, model), "random"
    model, meta = load_checkpoint(spec)
    return model, meta, "trained"


def backends(threads: int) -> dict[str, Callable]:
    """backend label -> factory(model, meta); each gets its own copy of the model."""
    from ferlab.inference.backends import OnnxBackend, TorchBackend

    return {
        "torch-fp32": lambda m, meta: TorchBackend.from_module(copy.deepcopy(m), meta, precision="fp32"),
        "torch-bf16": lambda m, meta: TorchBackend.from_module(copy.deepcopy(m), meta, precision="bf16",
                                                               channels_last=True),
        "onnx": lambda m, meta: OnnxBackend.from_model(m, meta, threads=threads),
    }


def throughput(run: Callable[[np.ndarray], np.ndarray], batch: int, min_time: float) -> float:
    """Images per second over repeated batches of ``batch`` random faces (after 2 warm-up batches)."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 1, 48, 48), dtype=np.uint8)  # (B, 1, 48, 48)
    for _ in range(2):
        run(x)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_time:
        run(x)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def latency_ms(run: Callable[[np.ndarray], np.ndarray], runs: int) -> float:
    """Median milliseconds of one single-face call."""
    x = np.random.default_rng(1).integers(0, 256, (1, 1, 48, 48), dtype=np.uint8)
    for _ in range(5):
        run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fer-resnet-s", "fer-mobile", "r002-vgg"])
    ap.add_argument("--backends", nargs="+", default=["torch-fp32", "torch-bf16", "onnx"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for torch and ONNX Runtime "
                    "(default: all cores)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed batches per measurement")
    ap.add_argument("--latency-runs", type=int, default=50)
    args = ap.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)  # the user's option: this script's whole point
    factories = backends(args.threads)
    unknown = set(args.backends) - set(factories)
    if unknown:
        ap.error(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(factories)}")
    from ferlab.pretrained import list_pretrained

    ensembles = {e["name"]: e["members"] for e in list_pretrained() if e.get("members")}
    for spec in args.models:  # before any timing: a shipped ensemble has no single weights to time
        if spec in ensembles and not Path(spec).exists():
            ap.error(f"{spec} is a shipped ensemble: time its members ({', '.join(ensembles[spec])}); it costs "
                     "about their sum")
    load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{cpu_name()}, {os.cpu_count()} cores; threads: torch {torch.get_num_threads()}, onnxruntime intra-op "
          f"{args.threads}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"load average before: {load_avg}")
    head = (f"{'model':<16} {'weights':<8} {'backend':<11} {f'images/s @{args.batch}':>15} "
            f"{'latency ms @1':>14} {'vs torch-fp32':>14}")
    print(head)
    print("-" * len(head))
    for spec in args.models:
        model, meta, weights = load(spec)
        base = None
        for label in args.backends:
            be = factories[label](model, meta)
            ips = throughput(be.logits, args.batch, args.min_time)
            lat = latency_ms(be.logits, args.latency_runs)
            base = ips if label == "torch-fp32" else base
            rel = f"{ips / base:.2f}x" if base else "-"
            print(f"{meta['model']['name']:<16} {weights:<8} {label:<11} {ips:>15,.0f} {lat:>14.2f} {rel:>14}",
                  flush=True)
    print("\nimages/s: batches of random 48x48 faces through backend.logits (normalisation included); latency: "
          "median of single-face calls. Detection and decoding are not included.")


if __name__ == "__main__":
    main()
