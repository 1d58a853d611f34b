"""Inference backends behind one small interface: ``probabilities(pixels (B, 1, H, W) uint8) -> (B, K) float32``.

:func:`open_backend` takes any model spec (run directory, .safetensors checkpoint, shipped name, shipped ensemble
name, or an exported .onnx file) with a test-time augmentation mode and returns a backend. Both backends apply
the checkpoints' normalisation, the TTA views and the ensemble mean themselves, so they take the same raw pixels
and, in fp32, give the same probabilities (within 1e-4, tested). On ONNX Runtime the views and members are one
graph (see :mod:`ferlab.inference.export`), so an .onnx file carries the TTA mode it was exported with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ferlab.inference.calibration import log_probabilities, scaled_probabilities
from ferlab.inference.loader import Ensemble, LoadedModel, ModelSpec, load_model
from ferlab.inference.predict import combine
from ferlab.transforms import tta_mode, tta_view_count


class Backend(Protocol):
    name: str
    weights: str  # where the weights came from: a shipped name, a run directory or a file
    meta: dict[str, Any]  # the (first member's) checkpoint metadata
    class_names: list[str]
    input_size: tuple[int, int]
    tta: str  # the test-time augmentation mode applied
    n_members: int  # 1, or the ensemble's size

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) uint8 -> (B, K) float32 probabilities."""
        ...

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) uint8 -> (B, K) float32 scores with softmax(scores) = probabilities: a single model's
        logits (mean over the TTA views), or an ensemble's log-probabilities, divided by the calibration
        temperature of a shipped model (1.0 otherwise)."""
        ...


def cost(tta: str, n_members: int, input_size: tuple[int, int] = (48, 48)) -> int:
    """Forward passes per face: views x members."""
    return tta_view_count(tta, (1, *input_size)) * n_members


class TorchBackend:
    """A PyTorch model or ensemble (a :class:`LoadedModel` or :class:`Ensemble`). precision: ``fp32`` (default;
    exact), ``bf16`` (bfloat16 autocast) or ``auto`` (bf16 where this CPU computes it natively, else fp32).
    tta: a mode of :data:`ferlab.transforms.TTA_MODES`.

    threads: calls ``torch.set_num_threads`` when given (a process-wide setting); None leaves torch's default.
    """

    name = "torch"

    def __init__(self, loaded: LoadedModel | Ensemble, precision: str = "fp32", tta: bool | str | None = "none",
                 channels_last: bool = False, threads: int | None = None, weights: str | None = None) -> None:
        import torch

        from ferlab.hardware import resolve_precision

        self.precision = resolve_precision(precision)[0]  # auto: bf16 where this CPU computes it natively
        if threads:
            torch.set_num_threads(threads)
        self.loaded, self.tta, self.channels_last = loaded, tta_mode(tta), channels_last
        self.members = loaded.members
        self.n_members = len(self.members)
        self.meta = loaded.meta
        self.class_names = list(loaded.class_names)
        self.input_size = tuple(loaded.input_size)
        self.weights = weights or loaded.source  # which weights: shipped name or path
        self.temperature = loaded.temperature(self.tta)  # the shelf's calibration for this TTA mode (1.0: none)

    @classmethod
    def from_module(cls, model: Any, meta: dict[str, Any], **kw: Any) -> TorchBackend:
        """A backend for a module in memory with its checkpoint metadata (e.g. a model just trained)."""
        return cls(LoadedModel.from_checkpoint(model, meta, source=f"{meta['model']['name']} (in memory)"), **kw)

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kw: Any) -> TorchBackend:
        return cls(load_model(spec), weights=str(spec), **kw)

    # the single model's module and normaliser (explanations run on one net: an ensemble's first member)
    @property
    def model(self) -> Any:
        return self.members[0].module

    @property
    def normalizer(self) -> Any:
        return self.members[0].normalizer

    def _views(self, pixels: np.ndarray) -> list[Any]:
        import torch

        x = torch.from_numpy(check_faces(pixels, self.input_size, self.weights))  # (B, 1, H, W) uint8
        return [m.view_logits(x, tta=self.tta, batch_size=max(1, len(x)), precision=self.precision,
                              channels_last=self.channels_last) for m in self.members]  # each (V, B, K)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return scaled_probabilities(self.logits(pixels), 1.0)  # (B, K)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        views = self._views(pixels)  # members x (V, B, K)
        if self.n_members == 1:
            return views[0].mean(0).numpy() / self.temperature  # (B, K)
        p = combine([v.mean(0).softmax(1).numpy() for v in views], self.loaded.weights)  # members' (B, K) -> (B, K)
        return log_probabilities(p) / self.temperature


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
        widths = {o.name: o.shape[-1] for o in self.session.get_outputs() if o.shape}
        if set(widths) != {"logits", "probabilities"}:
            raise ValueError(f"{name}: expected the outputs 'logits' and 'probabilities', found {sorted(widths)}; "
                             "export it with `ferlab export --onnx`")
        if any(isinstance(k, int) and k != len(self.class_names) for k in widths.values()):
            raise ValueError(f"{name}: damaged ferlab metadata in ONNX model ({len(self.class_names)} class names "
                             f"for {widths['probabilities']} outputs)")
        self.input_size = (int(inp.shape[2]), int(inp.shape[3]))
        inference = self.meta.get("inference", {})  # written by the export: the views and members in the graph
        self.tta = tta_mode(inference.get("tta", "none"))
        self.n_members = len(inference.get("members", [None]))

    @classmethod
    def from_model(cls, model: Any, meta: dict[str, Any], threads: int | None = None,
                   weights: str | None = None) -> OnnxBackend:
        """Export a module in memory and run it on ONNX Runtime (no file written); ``weights``: where they came
        from, for display."""
        loaded = LoadedModel.from_checkpoint(model, meta, source=weights or f"{meta['model']['name']} (in memory)")
        return cls.from_loaded(loaded, threads=threads, weights=weights)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel | Ensemble, tta: bool | str | None = "none", threads: int | None = None,
                    weights: str | None = None) -> OnnxBackend:
        """Export a loaded model or ensemble with its TTA views in memory and run it on ONNX Runtime."""
        from ferlab.inference.export import export_onnx

        return cls(export_onnx(loaded, tta=tta), threads=threads,
                   source_name=weights or f"{loaded.source} (exported in memory)")

    @classmethod
    def from_spec(cls, spec: ModelSpec, threads: int | None = None, tta: bool | str | None = None) -> OnnxBackend:
        if str(spec).lower().endswith(".onnx"):
            backend = cls(spec, threads=threads)
            if tta is not None and tta_mode(tta) != backend.tta:
                raise ValueError(f"{spec} was exported with test-time augmentation {backend.tta!r}, not "
                                 f"{tta_mode(tta)!r}: export it again with `ferlab export --onnx MODEL --tta "
                                 f"{tta_mode(tta)}`")
            return backend
        return cls.from_loaded(load_model(spec), tta=tta, threads=threads, weights=str(spec))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        x = check_faces(pixels, self.input_size, self.weights)  # (B, 1, H, W)
        return self.session.run(["probabilities"], {self.input_name: x})[0]  # (B, K)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        x = check_faces(pixels, self.input_size, self.weights)  # (B, 1, H, W)
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
    model, inference = meta.get("model"), meta.get("inference", {})
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)):
        raise ValueError(f"{source}: damaged ferlab metadata in ONNX model (no model name)")
    if not (isinstance(inference, dict) and isinstance(inference.get("tta", "none"), str)
            and isinstance(inference.get("members", []), list)):
        raise ValueError(f"{source}: damaged ferlab metadata in ONNX model (inference must hold tta and members)")
    meta["class_names"] = class_names
    return meta


def check_faces(pixels: np.ndarray, input_size: tuple[int, ...], source: str) -> np.ndarray:
    """``pixels`` as a contiguous uint8 (B, 1, H, W) array; ValueError unless (H, W) is the model's input size."""
    x = np.ascontiguousarray(pixels, np.uint8)
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != tuple(input_size):
        raise ValueError(f"{source} takes gray faces (batch, 1, {input_size[0]}, {input_size[1]}), got an array of "
                         f"shape {tuple(x.shape)}: crop and resize them first (ferlab.recognize does)")
    return x


def _from_onnxruntime(e: BaseException) -> bool:
    """True when ``e`` is one of ONNX Runtime's own exception types."""
    return (type(e).__module__ or "").startswith("onnxruntime")


BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend.from_spec,
    "onnx": OnnxBackend.from_spec,
}


def open_backend(spec: ModelSpec | LoadedModel | Ensemble, backend: str | None = None, *,
                 tta: bool | str | None = None, precision: str | None = None,
                 threads: int | None = None) -> Backend:
    """Backend ``backend`` (None: ``onnx`` for an .onnx file, else ``torch``) for any model spec, with test-time
    augmentation ``tta`` (None: an .onnx file's own mode, else none). ``precision`` applies to torch only."""
    is_onnx_file = isinstance(spec, str | Path) and str(spec).lower().endswith(".onnx")
    name = backend or ("onnx" if is_onnx_file else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "onnx":
        if precision is not None:
            raise ValueError("precision applies to the torch backend only")
        if isinstance(spec, LoadedModel | Ensemble):
            return OnnxBackend.from_loaded(spec, tta=tta or "none", threads=threads)
        return OnnxBackend.from_spec(spec, threads=threads, tta=tta)
    if is_onnx_file:
        raise ValueError(f"{spec}: an .onnx model runs on the onnx backend (backend='onnx', --backend onnx)")
    kw: dict[str, Any] = {"threads": threads, "tta": tta or "none"}
    if precision is not None:
        kw["precision"] = precision
    if isinstance(spec, LoadedModel | Ensemble):
        return TorchBackend(spec, **kw)
    return TorchBackend.from_spec(spec, **kw)


def create_backend(name: str | None, spec: ModelSpec, **kw: Any) -> Backend:
    """Backend ``name`` for model ``spec`` (see :func:`open_backend`, which this calls)."""
    return open_backend(spec, name, **kw)


def default_model() -> str:
    """The shipped model to use when none is named (the shelf's ``default`` role)."""
    from ferlab.pretrained import default_name

    return default_name()

