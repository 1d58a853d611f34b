"""Inference backends behind one small interface: ``logits(pixels (B, 1, H, W) uint8) -> (B, K) float32``.

``BACKENDS`` maps a name to a factory taking a model spec (run directory, .safetensors checkpoint, shipped
name; for ``onnx`` also an exported .onnx file). Both backends apply the checkpoint's normalisation, so they
take the same raw pixels and, in fp32, give the same logits (within 1e-4, tested).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ModelSpec = str | Path


class Backend(Protocol):
    name: str
    weights: str  # where the weights came from: a shipped name, a run directory or a file
    meta: dict[str, Any]
    class_names: list[str]
    input_size: tuple[int, int]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) uint8 -> (B, K) float32 logits."""
        ...


class TorchBackend:
    """A PyTorch model from a checkpoint. precision: ``fp32`` (default; exact), ``bf16`` (bfloat16 autocast) or
    ``auto`` (bf16 where this CPU computes it natively, else fp32).

    threads: calls ``torch.set_num_threads`` when given (a process-wide setting); None leaves torch's default.
    """

    name = "torch"

    def __init__(self, model: Any, meta: dict[str, Any], precision: str = "fp32", channels_last: bool = False,
                 threads: int | None = None, weights: str | None = None) -> None:
        import torch

        from ferlab.checkpoint import normalizer_from_meta
        from ferlab.hardware import resolve_precision

        precision = resolve_precision(precision)[0]  # auto: bf16 where this CPU computes it natively, else fp32
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval().to(memory_format=torch.channels_last) if channels_last else model.eval()
        self.meta, self.precision, self.channels_last = meta, precision, channels_last
        self.normalizer = normalizer_from_meta(meta)
        self.class_names = list(meta["class_names"])
        self.input_size = tuple(meta.get("preprocess", {}).get("input_size", model.input_size))
        self.weights = weights or f"{meta['model']['name']} (in memory)"  # which weights: shipped name or path

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kw: Any) -> TorchBackend:
        from ferlab.checkpoint import load_checkpoint

        if str(spec).lower().endswith(".onnx"):
            raise ValueError(f"{spec}: an .onnx model runs on the onnx backend (backend='onnx', --backend onnx)")
        model, meta = load_checkpoint(spec)
        return cls(model, meta, weights=str(spec), **kw)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        from ferlab.train.engine import predict_logits

        x = torch.from_numpy(np.ascontiguousarray(pixels, np.uint8))  # (B, 1, H, W) uint8
        out = predict_logits(self.model, x, self.normalizer, batch_size=max(1, len(x)), precision=self.precision,
                             channels_last=self.channels_last)
        return out.numpy()  # (B, K)


class OnnxBackend:
    """ONNX Runtime on the CPU. source: an exported .onnx file or its bytes (see :func:`export.export_onnx`).

    threads: ONNX Runtime's intra-op threads (None or 0: its default, one per physical core).
    """

    name = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int | None = None, source_name: str | None = None) -> None:
        import onnxruntime as ort

        name = source_name or (str(source) if not isinstance(source, bytes) else "<onnx bytes>")
        self.weights = name  # which weights: the .onnx file, or the checkpoint exported in memory
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such ONNX file")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or 0)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only
        src = source if isinstance(source, bytes) else str(source)
        try:
            self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises many types (InvalidArgument, InvalidProtobuf, Fail, ...)
            if not _from_onnxruntime(e):
                raise
            raise ValueError(f"{name}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        self.meta = read_onnx_meta(self.session.get_modelmeta().custom_metadata_map, name)
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)" or len(inp.shape) != 4:
            raise ValueError(f"{name}: expected a uint8 (batch, 1, H, W) input, found {inp.name} {inp.type} "
                             f"{inp.shape}; export it with `ferlab export --onnx`")
        self.input_name = inp.name
        self.class_names = list(self.meta["class_names"])
        self.input_size = (int(inp.shape[2]), int(inp.shape[3]))

    @classmethod
    def from_model(cls, model: Any, meta: dict[str, Any], threads: int | None = None,
                   weights: str | None = None) -> OnnxBackend:
        """Export ``model`` in memory and run it on ONNX Runtime (no file written); ``weights``: where they came
        from, for display."""
        from ferlab.recognize.export import export_onnx

        return cls(export_onnx(model, meta), threads=threads,
                   source_name=weights or f"{meta['model']['name']} (exported in memory)")

    @classmethod
    def from_spec(cls, spec: ModelSpec, threads: int | None = None) -> OnnxBackend:
        if str(spec).lower().endswith(".onnx"):
            return cls(spec, threads=threads)
        from ferlab.checkpoint import load_checkpoint

        model, meta = load_checkpoint(spec)
        return cls.from_model(model, meta, threads=threads, weights=str(spec))

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, np.uint8)  # (B, 1, H, W)
        return self.session.run(["logits"], {self.input_name: x})[0]  # (B, K)


def read_onnx_meta(custom: dict[str, str], source: str) -> dict[str, Any]:
    """The ferlab metadata in an ONNX model's metadata_props (``custom``); ValueError when absent."""
    if "ferlab" not in custom or "class_names" not in custom:
        raise ValueError(f"{source}: ONNX model without ferlab metadata (export it with `ferlab export --onnx`)")
    try:
        meta = json.loads(custom["ferlab"])
        class_names = json.loads(custom["class_names"])
    except ValueError as e:
        raise ValueError(f"{source}: damaged ferlab metadata in ONNX model ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: damaged ferlab metadata in ONNX model (expected an object, "
                         f"got {type(meta).__name__})")
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise ValueError(f"{source}: damaged ferlab metadata in ONNX model (class_names must be a list of strings)")
    meta["class_names"] = class_names
    return meta


def _from_onnxruntime(e: BaseException) -> bool:
    """True when ``e`` is one of ONNX Runtime's own exception types."""
    return (type(e).__module__ or "").startswith("onnxruntime")


BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend.from_spec,
    "onnx": OnnxBackend.from_spec,
}


def create_backend(name: str | None, spec: ModelSpec, **kw: Any) -> Backend:
    """Backend ``name`` for model ``spec``; None picks ``onnx`` for an .onnx file and ``torch`` otherwise."""
    if name is None:
        name = "onnx" if str(spec).lower().endswith(".onnx") else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](spec, **kw)


def default_model() -> str:
    """The shipped model to use when none is named: the manifest's ``default`` entry, else the first one."""
    from ferlab.pretrained import list_pretrained

    shipped = list_pretrained()
    if not shipped:
        raise ValueError("no pretrained model is shipped in this build: pass a run directory or a .safetensors "
                         "checkpoint, e.g. Recognizer('runs/fer-resnet-s') or --model runs/fer-resnet-s")
    return next((e["name"] for e in shipped if e.get("default")), shipped[0]["name"])
