"""ONNX export: a self-contained .onnx file that takes raw uint8 faces and returns logits and probabilities.

The checkpoint's normalisation is baked into the graph (uint8 -> float / 255 -> TTA views -> normaliser ->
model), so a runtime feeds pixels and needs nothing else. An ensemble exports as one graph that averages its
members' probabilities, and a test-time augmentation mode as the views inside the graph (see
:class:`ferlab.inference.predict.PixelsToProbabilities`). The class names and the (first member's) checkpoint
metadata, with the TTA mode and the members under ``inference``, are stored as JSON in the model's
``metadata_props`` (keys ``class_names`` and ``ferlab``), so ``Recognizer("model.onnx")`` rebuilds everything
from the one file.

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

from ferlab.inference.loader import Ensemble, LoadedModel
from ferlab.inference.predict import PixelsToProbabilities
from ferlab.transforms import Normalizer, tta_mode

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 20  # opsets this exporter writes and ONNX Runtime runs for these nets
AFFINE_MIN_OPSET = 16  # the affine views' resampling (GridSample) first exists in opset 16


def untrained_meta(model_name: str, model: nn.Module, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata for a freshly created model (random weights, [0, 1] inputs), built with ``model_args``: for speed
    tests and export tests."""
    from ferlab import CLASS_NAMES

    return {"model": {"name": model_name, "args": dict(model_args or {}), "num_classes": model.num_classes,
                      "in_chans": 1},
            "preprocess": {"normalize": Normalizer("unit").state(), "input_size": list(model.input_size)},
            "class_names": list(CLASS_NAMES)[: model.num_classes], "train": {"precision": "fp32"},
            "untrained": True}


def check_opset(opset: int, tta: str = "none") -> None:
    """ValueError unless ``opset`` can hold a model exported with the views of TTA mode ``tta``."""
    low = AFFINE_MIN_OPSET if tta == "affine" else MIN_OPSET
    if not (isinstance(opset, int) and low <= opset <= MAX_OPSET):
        raise ValueError(f"ONNX opset {opset} is not supported" + (" with --tta affine" if tta == "affine" else "")
                         + f": use {low} to {MAX_OPSET} (default {DEFAULT_OPSET})")


def export_onnx(model: nn.Module | LoadedModel | Ensemble, meta: dict[str, Any] | None = None,
                out: str | Path | None = None, opset: int = DEFAULT_OPSET, tta: bool | str | None = "none") -> bytes:
    """Export a model or ensemble (with its normalisation and the views of ``tta``) to ONNX with a dynamic batch
    axis. A bare module needs its checkpoint ``meta``.

    Returns the serialised model; also writes it to ``out`` when given.

    Example::

        export_onnx(load_model("fer2013-ensemble"), out="ensemble.onnx", tta="flip")
    """
    import onnx

    if isinstance(model, nn.Module):
        if meta is None:
            raise ValueError("export_onnx of a bare module needs its checkpoint metadata (meta)")
        model = LoadedModel.from_checkpoint(model, meta, source=f"{meta['model']['name']} (in memory)")
    loaded = model
    mode = tta_mode(tta)
    check_opset(opset, mode)
    h, w = loaded.input_size
    members = loaded.members
    temperature = loaded.temperature(mode)  # a shipped model's calibration, baked into the graph
    graph = PixelsToProbabilities([(m.module, m.normalizer) for m in members], mode, (h, w), temperature,
                                  loaded.weights).eval()
    example = torch.zeros(2, 1, h, w, dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        # the trainer's channels_last layout would be baked into the graph as transposes: export in the plain one
        for m in members:
            m.module.to(memory_format=torch.contiguous_format)
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}})
    proto = onnx.load_from_string(buf.getvalue())
    meta_out = dict(loaded.meta)
    meta_out["inference"] = {"tta": mode, "members": [m.source for m in members], "weights": loaded.weights,
                             "name": loaded.source, "kind": "ensemble" if len(members) > 1 else "single",
                             "temperature": temperature}
    props = {"ferlab": json.dumps(meta_out), "class_names": json.dumps(list(loaded.class_names)),
             "input": f"{INPUT_NAME}: uint8 gray faces (batch, 1, {h}, {w}); normalisation is part of the graph",
             "outputs": (f"logits (batch, classes) divided by the calibration temperature {temperature:g}; "
                         "probabilities = softmax(logits)" if len(members) == 1 else
                         "probabilities (batch, classes): the mean of the members', recalibrated with temperature "
                         f"{temperature:g}; logits = log(probabilities)"),
             "tta": mode}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    classes = ", ".join(loaded.class_names)
    what = loaded.members[0].architecture if len(members) == 1 else f"ensemble of {len(members)}"
    proto.doc_string = f"ferlab {what}: facial expression classifier ({classes}); TTA {mode}"
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

