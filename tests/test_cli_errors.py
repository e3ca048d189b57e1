"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from trainfluence.checkpoint import save_checkpoint
from trainfluence.cli import main
from trainfluence.models import build_model


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    # what a terminal shows: a progress bar cleared with carriage returns leaves nothing behind
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("trainfluence: error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_unknown_dataset(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--dataset", "imagenet"), "unknown dataset spec 'imagenet'")


def test_unknown_architecture(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--arch", "vgg99"), "unknown architecture 'vgg99'")


def test_missing_dataset_files(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-root", str(tmp_path))
    assert_one_line_error(code, err, "--download")
    assert str(tmp_path / "MNIST" / "raw") in err


def test_impossible_noise_rate(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--label-noise", "1.5"), "--label-noise: must be a finite number in [0, 1], got 1.5")


def test_corrupt_image_in_folder(capsys, tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "good.png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    code, err = run_cli(capsys, "train", "--dataset", f"folder:{tmp_path}")
    assert_one_line_error(code, err, "broken.jpg")


def test_checkpoint_for_other_architecture_and_classes(capsys, tmp_path, shapes_run):
    from trainfluence.checkpoint import load_checkpoint

    meta = load_checkpoint(shapes_run["checkpoint"]).meta
    bad = save_checkpoint(tmp_path / "bad.pt", build_model("mlp", 5, 3, 32), meta)
    assert_one_line_error(*run_cli(capsys, "evaluate", "--checkpoint", str(bad)), "does not fit architecture 'cnn'")
    code, err = run_cli(capsys, "evaluate", "--checkpoint", str(shapes_run["checkpoint"]), "--dataset", "shapes",
                        "--image-size", "24")
    assert_one_line_error(code, err, "expects 3x32x32")
    assert_one_line_error(*run_cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "nope.pt")), "not found")


def test_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "trainfluence", "train", "--dataset", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("trainfluence: error: unknown dataset spec") and "Traceback" not in proc.stderr


def test_help_of_every_command(capsys):
    from trainfluence.cli import COMMANDS, build_parser

    import pytest as _pytest

    with _pytest.raises(SystemExit) as top:
        build_parser().parse_args(["--help"])
    assert top.value.code == 0
    listing = capsys.readouterr().out
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]  # type: ignore[union-attr]
    assert len(names) == len(COMMANDS) >= 8
    for name in names:
        assert name in listing
        with _pytest.raises(SystemExit) as exc:
            build_parser().parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage: trainfluence " + name in capsys.readouterr().out
