"""ONNX export: a self-contained .onnx file that takes raw uint8 faces and returns logits and probabilities.

The checkpoint's normalisation is baked into the graph (uint8 -> float / 255 -> normaliser -> model), so a
runtime feeds pixels and needs nothing else. The class names and the checkpoint's full ferlab metadata are
stored as JSON in the model's ``metadata_props`` (keys ``class_names`` and ``ferlab``), so
``Recognizer("model.onnx")`` rebuilds everything from the one file.

Uses PyTorch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter, torch's default since 2.9,
needs the ``onnxscript`` package, which ferlab does not depend on.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferlab.checkpoint import normalizer_from_meta
from ferlab.transforms import Normalizer

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
DEFAULT_OPSET = 17


class PixelsToLogits(nn.Module):
    """(B, 1, H, W) uint8 pixels -> ((B, K) logits, (B, K) probabilities), normalisation included."""

    def __init__(self, model: nn.Module, normalizer: Normalizer) -> None:
        super().__init__()
        self.model, self.normalizer = model, normalizer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalizer(pixels.float() / 255.0)  # (B, 1, H, W) model input
        logits = self.model(x)  # (B, K)
        return logits, logits.softmax(-1)


def untrained_meta(model_name: str, model: nn.Module) -> dict[str, Any]:
    """Metadata for a freshly created model (random weights, [0, 1] inputs): for speed tests and export tests."""
    from ferlab import CLASS_NAMES

    return {"model": {"name": model_name, "args": {}, "num_classes": model.num_classes, "in_chans": 1},
            "preprocess": {"normalize": Normalizer("unit").state(), "input_size": list(model.input_size)},
            "class_names": list(CLASS_NAMES)[: model.num_classes], "train": {"precision": "fp32"},
            "untrained": True}


def export_onnx(model: nn.Module, meta: dict[str, Any], out: str | Path | None = None,
                opset: int = DEFAULT_OPSET) -> bytes:
    """Export ``model`` (with the normalisation of ``meta``) to ONNX with a dynamic batch axis.

    Returns the serialised model; also writes it to ``out`` when given.

    Example::

        model, meta = ferlab.checkpoint.load_checkpoint("runs/fer-resnet-s")
        export_onnx(model, meta, "fer-resnet-s.onnx")
    """
    import onnx

    h, w = meta.get("preprocess", {}).get("input_size", getattr(model, "input_size", (48, 48)))
    wrapper = PixelsToLogits(model.eval(), normalizer_from_meta(meta)).eval()
    example = torch.zeros(2, 1, h, w, dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}})
    proto = onnx.load_from_string(buf.getvalue())
    props = {"ferlab": json.dumps(meta), "class_names": json.dumps(list(meta["class_names"])),
             "input": f"{INPUT_NAME}: uint8 gray faces (batch, 1, {h}, {w}); normalisation is part of the graph",
             "outputs": "logits (batch, classes); probabilities = softmax(logits)"}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    classes = ", ".join(meta["class_names"])
    proto.doc_string = f"ferlab {meta['model']['name']}: facial expression classifier ({classes})"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if out is not None:  # written next to the target, then renamed: never half a file; the umask decides the mode
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return data

