"""The generated references (docs/cli.md, docs/config.md) match the code."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_the_committed_cli_and_config_references_are_current():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "gen_reference.py"), "--check"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_the_references_name_every_command_and_field():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(REPO / "tools"))
    from ferlab.cli import build_parser
    from ferlab.train.config import TrainConfig

    cli, config = gen_reference.cli_page(), gen_reference.config_page()
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name in sub.choices:
        assert f"## ferlab {name}\n" in cli
    assert "`--label-mode` LABEL_MODE" in cli and "%%" not in cli
    for f in TrainConfig.__dataclass_fields__:
        assert f"| `{f}` |" in config
