"""The README is run, not just read: its Python API example works as written, and every command's --help is
clean (no doubled defaults, no stray formatting)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = ("\nimport numpy, torch\n"
             "assert isinstance(scores, numpy.ndarray) and scores.shape == (2, len(train_set))\n"
             "assert top.helpful_index.shape == (1, 5) and (top.helpful_score <= 0).all() and (top.harmful_score >= 0).all()\n"
             "assert isinstance(suspicion, numpy.ndarray) and suspicion.shape == (len(train_set),) and (suspicion >= 0).all()\n"
             "assert isinstance(pixels, torch.Tensor) and pixels.shape == x.shape\n")
    env = {**os.environ, "TRAINFLUENCE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "influence: solver ekfac (auto)" in proc.stdout  # engine.plan()


def test_help_is_clean_for_every_command(capsys):
    import pytest

    from trainfluence.cli import build_parser

    parser = build_parser()
    for name in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        out = capsys.readouterr().out
        assert "%%" not in out and "%(" not in out, name
        for option in re.split(r"\n  (?=-)", out):
            assert option.count("(default") <= 1, (name, option)
