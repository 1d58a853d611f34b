"""Build ``ferlab/recognize/mtcnn.safetensors`` from the MTCNN weights in the facenet-pytorch wheel (MIT licence).

    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp && unzip -q /tmp/fnp/*.whl -d /tmp/fnp/x
    python tools/convert_mtcnn.py /tmp/fnp/x/facenet_pytorch/data

The wheel's ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` are plain state dicts; they are read with
``torch.load(weights_only=True)`` (no unpickling of code) and stored as one fp16 safetensors file, keys prefixed
``pnet.``, ``rnet.``, ``onet.``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "ferlab" / "recognize" / "mtcnn.safetensors"


def main(folder: str) -> int:
    state = {}
    for name in ("pnet", "rnet", "onet"):
        for k, v in torch.load(Path(folder) / f"{name}.pt", weights_only=True).items():
            state[f"{name}.{k}"] = v.to(torch.float16).contiguous()
    save_file(state, str(OUT), metadata={"source": "facenet-pytorch 2.6.0 (MIT licence), data/{p,r,o}net.pt",
                                         "dtype": "float16"})
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
