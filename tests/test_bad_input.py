"""Hostile and broken input: every case ends in one line on stderr and exit code 2 (or a one-line note and a
rebuild, for a damaged cache), with no traceback, no code run that the user did not name, nothing non-finite in
a result, nothing left behind and nothing lost."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainfluence.checkpoint import load_checkpoint, save_checkpoint
from trainfluence.cli import main
from trainfluence.data import DataConfig, load_dataset
from trainfluence.data.source import TensorSource
from trainfluence.errors import UserError
from trainfluence.files import npy_writer, save_verified, temporary_name
from trainfluence.influence import InfluenceEngine
from trainfluence.models import build_model

from .test_cli_errors import assert_one_line_error

ENV = {**os.environ, "TRAINFLUENCE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def cli(*argv: str, cwd: Path | None = None, limit_bytes: int | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m trainfluence`` in a fresh process (optionally with a file-size limit: a full disk)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "trainfluence", *argv], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit if limit_bytes else None)


def refused(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert_one_line_error(proc.returncode, proc.stderr, pattern)


def leftovers(folder: Path) -> list[str]:
    """Temporary or empty files under ``folder`` — what an interrupted or failed write must not leave."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.stat().st_size == 0)
            and not p.name.startswith(".lock")]


@pytest.fixture(scope="module")
def ckpt(shapes_run):
    return load_checkpoint(shapes_run["checkpoint"])


def craft(path: Path, ckpt, *, state=None, **meta) -> Path:
    """A checkpoint with a valid checksum but metadata or weights of our choosing."""
    model = build_model("cnn", 5, 3, 32)
    model.load_state_dict(state or ckpt.model.state_dict())
    return save_checkpoint(path, model, dataclasses.replace(ckpt.meta, **meta))


# ---- 1. trust boundary ------------------------------------------------------------------------------------------
EVIL = """
from pathlib import Path
Path("marker").write_text("ran")
def build(**kwargs):
    Path("marker").write_text("ran")
    from trainfluence.models import small_cnn
    return small_cnn(**kwargs)
"""


def test_checkpoint_cannot_choose_code_to_run(ckpt, tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    craft(tmp_path / "evil.pt", ckpt, arch="evil:build")
    proc = cli("evaluate", "--checkpoint", "evil.pt", "--test-size", "20", cwd=tmp_path)
    refused(proc, "not a registered one")
    assert "--arch evil:build" in proc.stderr  # says how to allow it
    assert not (tmp_path / "marker").exists()
    # only the user can allow it
    allowed = cli("evaluate", "--checkpoint", "evil.pt", "--arch", "evil:build", "--test-size", "20", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "marker").exists()


def test_checkpoint_settings_never_download(ckpt, tmp_path, capsys):
    path = craft(tmp_path / "dl.pt", ckpt, data={"spec": "mnist", "data_root": str(tmp_path / "empty"), "download": True})
    assert load_checkpoint(path).meta.data_config.download is False
    code = main(["evaluate", "--checkpoint", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, "add --download to fetch them")


@pytest.mark.parametrize("damage,pattern", [
    ("flip a weight byte", "is corrupted"),
    ("nan weights", "non-finite values (NaN or Inf) in weight 'classifier.1.weight'"),
    ("huge image size", "invalid metadata (image_size"),
    ("class list", "invalid metadata (arch or class names)"),
    ("not a checkpoint", "not a readable checkpoint"),
])
def test_damaged_or_crafted_checkpoint(ckpt, tmp_path, capsys, damage, pattern):
    path = tmp_path / "bad.pt"
    if damage == "flip a weight byte":
        craft(path, ckpt)
        with zipfile.ZipFile(path) as z:  # torch stores tensors uncompressed: find one and change a byte of it
            info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
            offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x40
        path.write_bytes(bytes(raw))
    elif damage == "nan weights":
        state = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
        state["classifier.1.weight"][0, 0] = float("nan")
        craft(path, ckpt, state=state)
    elif damage == "huge image size":
        craft(path, ckpt, image_size=10**9)
    elif damage == "class list":
        craft(path, ckpt, classes=["a"])
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_line_error(main(["evaluate", "--checkpoint", str(path)]), capsys.readouterr().err, pattern)


# ---- 3. every numeric flag validated at parse time -------------------------------------------------------------
BAD_FLAGS = [
    (["explain", "--damping", "nan"], "argument --damping: must be a finite number in [0, 1e+08] or 'auto', got nan"),
    (["explain", "--damping", "inf"], "argument --damping"),
    (["explain", "--damping", "-1"], "argument --damping"),
    (["explain", "--damping", "1e300"], "argument --damping"),
    (["explain", "--weight-decay", "nan"], "argument --weight-decay"),
    (["explain", "--cg-rtol", "0"], "argument --cg-rtol: must be a finite number in (0, 1), got 0"),
    (["explain", "--lissa-depth", "0"], "argument --lissa-depth"),
    (["explain", "--lissa-batch-size", "0"], "argument --lissa-batch-size"),
    (["explain", "--lissa-scale", "inf"], "argument --lissa-scale"),
    (["explain", "--lissa-tol", "0"], "argument --lissa-tol"),
    (["explain", "--lissa-scale-factor", "0.5"], "argument --lissa-scale-factor"),
    (["explain", "--damping", "autumn"], "argument --damping"),
    (["explain", "--lissa-depth", "2.5"], "argument --lissa-depth: must be a positive integer, got 2.5"),
    (["explain", "--cg-maxiter", "0"], "argument --cg-maxiter"),
    (["explain", "--hessian-samples", "0"], "argument --hessian-samples"),
    (["explain", "--top", "0"], "argument --top"),
    (["explain", "--index", "-1"], "argument --index"),
    (["audit", "--top", "0"], "argument --top"),
    (["train", "--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
    (["train", "--epochs", "0"], "argument --epochs"),
    (["train", "--train-size", "0"], "argument --train-size: must be a positive integer or none, got 0"),
    (["train", "--test-size", "0"], "argument --test-size"),
    (["train", "--image-size", "0"], "argument --image-size"),
    (["train", "--label-noise", "-0.1"], "argument --label-noise"),
    (["train", "--noise-kind", "sideways"], "argument --noise-kind: invalid choice"),
    (["saliency", "--eval-size", "0"], "argument --eval-size"),
    (["internal", "--top", "0"], "argument --top"),
    (["explain", "--test-indx", "3"], "unknown option --test-indx (did you mean --index?)"),
]


@pytest.mark.parametrize("argv,pattern", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_anything_runs(capsys, argv, pattern, tmp_path):
    command, rest = argv[0], argv[1:]
    needs = {"explain": ["--checkpoint", "x.pt", "--index", "0"], "audit": ["--checkpoint", "x.pt"],
             "saliency": ["--checkpoint", "x.pt"], "internal": ["--checkpoint", "x.pt", "--layer", "l", "--class", "0"],
             "train": ["--out", str(tmp_path / "never")]}[command]
    code = main([command, *needs, *rest])
    assert_one_line_error(code, capsys.readouterr().err, pattern)
    assert not (tmp_path / "never").exists()


def test_cli_usage_errors_answer_before_torch_loads():
    """A bad flag and --help are answered without importing torch (so in well under a second)."""
    code = ("import sys, trainfluence.cli as c\n"
            "rc = c.main(['train', '--lr', 'nan'])\n"
            "assert rc == 2 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - started < 5  # the interpreter's own start included; torch alone takes longer


@pytest.mark.parametrize("argv,pattern", [
    (["internal", "--layer", "features.8", "--class", "disc", "--doi", "path:999"], "--doi path:999: image 999 is out of range"),
    (["internal", "--layer", "features.8", "--class", "disc", "--versus", "pred"], "--versus: unknown class 'pred'"),
    (["explain", "--index", "99999"], "--index 99999 is out of range"),
    (["explain", "--index", "0", "--solver", "exact", "--lissa-depth", "100"], "--lissa-depth applies to --solver lissa"),
    (["saliency", "--index", "0", "--target", "square-nothing"], "--target: unknown class 'nothing'"),
])
def test_bad_values_found_when_reading_data(shapes_run, capsys, tmp_path, argv, pattern):
    code = main([argv[0], "--checkpoint", str(shapes_run["checkpoint"]), "--train-size", "100", "--test-size", "50",
                 "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *argv[1:]]
                if argv[0] == "explain" else
                [argv[0], "--checkpoint", str(shapes_run["checkpoint"]), "--test-size", "50", "--out", str(tmp_path / "out"),
                 *argv[1:]])
    assert_one_line_error(code, capsys.readouterr().err, pattern)


# ---- 2. finite everywhere -----------------------------------------------------------------------------------------
class NaNOnBright(torch.nn.Module):
    """A model whose output is NaN for inputs whose first pixel is above 1."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        bad = (x[:, :1] > 1).to(x.dtype)
        return self.fc(x) + torch.log(1 - 2 * bad)


def test_non_finite_values_stop_where_they_appear(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    with pytest.raises(UserError, match=r"non-finite values \(NaN or Inf\) in the inputs"):
        TensorSource(torch.where(x > 0.99, float("nan"), x), y)
    x[7, 0] = 1.5  # example 7 makes the model's loss NaN
    engine = InfluenceEngine(NaNOnBright(), (x, y), params="all", cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"in the per-example losses of train examples 0\.\.39: the model gives NaN"):
        engine.build_cache()
    with pytest.raises(UserError, match="non-finite values"):
        engine.s_test((x[5:9], y[5:9]))
    with pytest.raises(UserError, match="InfluenceEngine has no option 'dampnig'"):
        InfluenceEngine(NaNOnBright(), (x, y), dampnig=0.1)
    with pytest.raises(UserError, match="--damping must be a finite number"):
        InfluenceEngine(NaNOnBright(), (x, y), damping=float("nan"))
    with pytest.raises(UserError, match="--lissa-depth must be a positive integer, got 0"):
        InfluenceEngine(NaNOnBright(), (x, y), solver="lissa", solver_settings={"depth": 0})
    with pytest.raises(UserError, match="params given both as an argument and in StoreSettings"):
        from trainfluence.settings.influence import StoreSettings

        InfluenceEngine(NaNOnBright(), (x, y), params="all", store=StoreSettings(params="last"))


def test_faiss_no_result_never_reaches_a_caller(shapes_run, tmp_path):
    from trainfluence.search import GradientIndex
    from trainfluence.settings.influence import SearchSettings

    train = load_dataset(DataConfig("shapes", train_size=200, test_size=10), "train")
    engine = InfluenceEngine(shapes_run["checkpoint"], train, cache_dir=tmp_path)
    store = engine.build_cache()
    index = GradientIndex(store, SearchSettings(kind="ivf", nlist=20, nprobe=1))
    with pytest.raises(UserError, match="returned fewer than 150 results"):
        index.search(store.read(slice(0, 2)), 150)
    with pytest.raises(UserError, match="non-finite values"):
        index.search(np.full((1, store.dim), np.nan, dtype=np.float32), 5)


# ---- 4. solvers report convergence ------------------------------------------------------------------------------
def test_solver_flags_with_solver_auto_must_fit_its_choice(tmp_path):
    from trainfluence.cli import build_parser
    from trainfluence.cli.flags import settings_from
    from trainfluence.cli.influence_args import solver_options
    from trainfluence.settings.influence import InfluenceSettings, LissaSettings

    def options(*flags: str):
        args = build_parser().parse_args(["explain", "--checkpoint", "x.pt", "--index", "0", *flags])
        return solver_options(args, settings_from(args, InfluenceSettings).solver)

    assert options() is None
    assert options("--lissa-depth", "50") == LissaSettings(depth=50)  # one solver's flags: kept for auto's choice
    with pytest.raises(UserError, match="--cg-maxiter applies to --solver cg, but the solver is auto"):
        options("--lissa-depth", "50", "--cg-maxiter", "5")
    with pytest.raises(UserError, match="--lissa-depth applies to --solver lissa, but the solver is cg"):
        options("--solver", "cg", "--lissa-depth", "50")
    # auto picks exact for 39 parameters: LiSSA's settings are refused, naming the solver that takes them
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    data = (torch.randn(20, 1, 3, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(UserError, match=r"LissaSettings \(--lissa-… options\) configure --solver lissa, but the solver is exact"):
        InfluenceEngine(model, data, weight_decay=0.0, solver_settings=LissaSettings(depth=50), cache_dir=tmp_path)
    assert InfluenceEngine(model, data, weight_decay=0.0, solver="lissa", solver_settings=LissaSettings(depth=50),
                           cache_dir=tmp_path).solver.settings.depth == 50


def test_unconverged_solve_warns_records_and_strict_refuses(shapes_run, tmp_path, capsys):
    base = ["explain", "--checkpoint", str(shapes_run["checkpoint"]), "--train-size", "200", "--test-size", "20",
            "--index", "0", "--cache-dir", str(tmp_path / "cache"), "--solver", "cg", "--cg-maxiter", "1", "--params", "last"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "trainfluence: warning: cg did not converge: relative residual" in err and "after 1 steps" in err
    solves = json.loads((tmp_path / "a" / "influence.json").read_text())["solves"]
    assert solves and not solves[0]["converged"] and solves[0]["steps"] == 1 and solves[0]["value"] > 1e-6
    assert "did not converge" in (tmp_path / "a" / "index.html").read_text()
    code = main([*base, "--strict", "--cg-maxiter", "2", "--out", str(tmp_path / "b")])
    # the plan note printed before the solve started stays; the error itself is one line
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("trainfluence: note:"))
    assert_one_line_error(code, err, "cg did not converge")
    assert not (tmp_path / "b" / "influence.json").exists()


# ---- 5. every cached artefact verified ----------------------------------------------------------------------------
def test_damaged_index_stest_and_manifest_are_rebuilt(shapes_run, tmp_path, capsys):
    train = load_dataset(DataConfig("shapes", train_size=300, test_size=10), "train")
    test = load_dataset(DataConfig("shapes", train_size=300, test_size=10), "test")

    def engine() -> InfluenceEngine:
        return InfluenceEngine(shapes_run["checkpoint"], train, params="last", cache_dir=tmp_path)

    first, s_first = engine().top_k(test, 5), engine().s_test(test)
    (index,) = tmp_path.glob("grads-*/index-*.faiss")
    (vectors,) = tmp_path.glob("stest-*/*.npy")
    capsys.readouterr()
    for damage in ("edit", "truncate"):
        for path in (index, vectors):
            raw = bytearray(path.read_bytes())
            if damage == "edit":
                raw[len(raw) // 2] ^= 0x01
            path.write_bytes(bytes(raw) if damage == "edit" else bytes(raw[: len(raw) // 2]))
        again = engine().top_k(test, 5)
        np.testing.assert_array_equal(again.helpful_index, first.helpful_index)
        np.testing.assert_allclose(again.harmful_score, first.harmful_score, rtol=1e-6)
        err = capsys.readouterr().err
        assert "faiss index" in err and "rebuilding it" in err and "cached s_test" in err and "solving again" in err
    # a cached s_test full of NaN, even with a matching checksum, is solved again, never used
    save_verified(vectors, npy_writer(np.full(np.load(vectors).shape, np.nan, dtype=np.float32)))
    assert torch.allclose(engine().s_test(test), s_first)
    # a manifest that is not JSON (or fails its checksum) is noticed and the store rebuilt
    (manifest,) = tmp_path.glob("grads-*/manifest.json")
    manifest.write_text("{ not json")
    again = engine()
    np.testing.assert_array_equal(again.top_k(test, 5).helpful_index, first.helpful_index)
    assert again.build_report.built_chunks == again.store.num_chunks
    assert "damaged manifest.json" in capsys.readouterr().err


# ---- 6. runs identified -----------------------------------------------------------------------------------------
def test_tracin_reads_only_its_own_run(tmp_path):
    from trainfluence.audit.scores import run_metas
    from trainfluence.train import TrainConfig, train

    cfg = DataConfig(train_size=200, test_size=50)
    tr, te = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    train(TrainConfig(epochs=3, seed=1), tr, te, tmp_path, progress=False)
    train(TrainConfig(epochs=2, seed=2), tr, te, tmp_path, progress=False)  # a second run into the same folder
    final = load_checkpoint(tmp_path / "final.pt")
    run, notes = run_metas(final)
    assert [p.name for p, _ in run] == ["epoch-1.pt", "epoch-2.pt"]
    assert notes and "epoch-3.pt" in notes[0] and "another run" in notes[0]


# ---- 7. resources --------------------------------------------------------------------------------------------------
def test_full_disk_is_one_line_and_leaves_nothing(shapes_run, tmp_path):
    ckpt = str(shapes_run["checkpoint"])
    proc = cli("cache", "--checkpoint", ckpt, "--train-size", "2000", "--params", "all", "--cache-dir", str(tmp_path / "c"),
               limit_bytes=4 << 20)
    refused(proc, "no space left to write")
    assert not leftovers(tmp_path / "c") and not list((tmp_path / "c").rglob("grads.npy"))
    proc = cli("train", "--train-size", "200", "--test-size", "20", "--epochs", "1", "--out", str(tmp_path / "t"),
               limit_bytes=64 << 10)
    refused(proc, "is the disk full?")
    assert not leftovers(tmp_path / "t") and not list((tmp_path / "t").glob("*.pt"))


def test_store_larger_than_the_free_space_is_refused_before_writing(shapes_run, tmp_path, capsys, monkeypatch):
    """A full-gradient store that cannot fit is refused up front with its size and the ways to shrink it (a
    resnet18's gradients on 50,000 images are 2.2 TB), before a manifest or an array is written."""
    import types

    import trainfluence.store.format as store_format

    monkeypatch.setattr(store_format.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 20))
    code = main(["cache", "--checkpoint", str(shapes_run["checkpoint"]), "--train-size", "300", "--params", "all",
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "--projection-dim 4096")
    dim = sum(p.numel() for p in load_checkpoint(shapes_run["checkpoint"]).model.parameters())
    assert f"{300 * (dim * 4 + 24) / 2**30:,.1f} GiB ({300:,} examples × {dim:,} values, fp32)" in err
    assert not list((tmp_path / "c").rglob("manifest.json")) and not list((tmp_path / "c").rglob("*.npy"))


def test_decompression_bomb_named(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "ok.png")
    Image.new("1", (12_000, 12_000)).save(tmp_path / "train" / "a" / "bomb.png")  # 144 Mpx in a few kB
    assert (tmp_path / "train" / "a" / "bomb.png").stat().st_size < 100_000
    code = main(["train", "--dataset", f"folder:{tmp_path}", "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "bomb.png")


def test_large_top_is_drawn_capped(shapes_run, tmp_path, capsys):
    code = main(["explain", "--checkpoint", str(shapes_run["checkpoint"]), "--train-size", "2500", "--test-size", "10",
                 "--index", "0", "--top", "2000", "--params", "last", "--out", str(tmp_path / "x"),
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "x" / "influence.json").read_text())
    assert len(report["explanations"][0]["helpful"]) == 2000
    shown = report["explanations"][0]["helpful"] + report["explanations"][0]["harmful"]  # exact solver: Newton steps
    assert all(0 <= e["leverage"] < 1 and e["predicted_loss_change_if_removed"] is not None for e in shown)
    with Image.open(tmp_path / "x" / "explain-0.png") as im:
        assert im.width * im.height < 4_000_000


def test_interrupted_fix_leaves_no_temporary_folder(tmp_path):
    from trainfluence.train import TrainConfig, train

    cfg = DataConfig(train_size=300, test_size=30)
    train(TrainConfig(epochs=4), load_dataset(cfg, "train"), load_dataset(cfg, "test"), tmp_path / "run", progress=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen([sys.executable, "-m", "trainfluence", "audit", "--checkpoint", str(tmp_path / "run" / "final.pt"),
                                 "--score", "loss", "--params", "last", "--fix", "3", "--out", str(tmp_path / "audit"),
                                 "--cache-dir", str(tmp_path / "cache")],
                                env={**ENV, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and not list(tmp.glob("trainfluence-fix-*/*/epoch-*.pt")):
            time.sleep(0.05)
        assert list(tmp.glob("trainfluence-fix-*")), "the fix experiment never started"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        assert "Traceback" not in err
        assert not list(tmp.glob("trainfluence-*")), list(tmp.iterdir())  # (torch keeps its own cache there)


def test_concurrent_builds_of_one_store_share_the_work(shapes_run, tmp_path):
    argv = [sys.executable, "-m", "trainfluence", "cache", "--checkpoint", str(shapes_run["checkpoint"]), "--train-size",
            "1500", "--params", "all", "--projection-dim", "512", "--chunk-size", "100", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    texts = sorted(o for o, _ in outs)
    assert sum("built 15 chunk(s)" in t for t in texts) == 1 and sum("reused" in t for t in texts) == 1, texts


def test_temporary_names_carry_the_process_id(tmp_path):
    assert f".{os.getpid()}." in temporary_name(tmp_path / "x.json").name


# ---- 8. CSV cells escaped ---------------------------------------------------------------------------------------
def test_csv_cells_cannot_be_formulas(tmp_path, capsys):
    from trainfluence.report.csvfile import cell

    assert cell("=1+1") == "'=1+1" and cell("@SUM(A1)") == "'@SUM(A1)" and cell("+x") == "'+x" and cell("-x") == "'-x"
    assert cell("-0.25") == "-0.25" and cell(-3) == -3 and cell("cat") == "cat"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(["=HYPERLINK(\"x\")", "@cmd"]):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((8, 8, 3)) * 120 + 100 * c).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / name / f"{i}.png")
    spec = f"folder:{tmp_path / 'imgs'}"
    assert main(["train", "--dataset", spec, "--image-size", "8", "--epochs", "1", "--arch", "logreg",
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["audit", "--checkpoint", str(tmp_path / "run" / "final.pt"), "--score", "loss", "margin",
                 "--out", str(tmp_path / "audit"), "--cache-dir", str(tmp_path / "cache")]) == 0
    text = (tmp_path / "audit" / "suspects.csv").read_text()
    import csv

    rows = list(csv.DictReader(text.splitlines()))
    assert {r["given_label"] for r in rows} == {"'=HYPERLINK(\"x\")", "'@cmd"}
    assert all(r["path"].endswith(".png") for r in rows)
    assert any(r["margin"].startswith("-") for r in rows)  # numbers are left as numbers
    capsys.readouterr()
