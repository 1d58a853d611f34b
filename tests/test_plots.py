"""ferlab.plots: PNG figures that leave the caller's matplotlib state alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_plots_write_pngs_and_keep_the_callers_backend(tmp_path):
    # in a fresh interpreter: the caller (a notebook, say) has chosen a backend; ferlab's plots must not switch it
    code = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import numpy as np
        from ferlab.plots import plot_confusion, plot_history
        plot_confusion(np.eye(7, dtype=int) * 5 + 1, list("abcdefg"), r"{tmp_path}/cm.png", title="t")
        h = [dict(epoch=e, train_acc=0.5, val_acc=0.4, train_loss=1.0, val_loss=1.2, size=48) for e in (1, 2)]
        plot_history(h, r"{tmp_path}/h.png")
        print(matplotlib.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    for name in ("cm.png", "h.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
