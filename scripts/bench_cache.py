"""Benchmark of the gradient store (issue: per-example gradient store).

Measures, in one run on MNIST with the default CNN: per-example gradient throughput of the store build against
plain batched forward+backward of the same model on the same data (the physical limit) and against a
per-example autograd loop; the projection's overhead (CountSketch vs dense Gaussian); build time and size of
the store of all 60,000 training images at k = 4096, with CountSketch and with the factored (LoGra) Kronecker
projection; throughput against k and against model size (the default CNN and resnet18 at 32×32); top-10 query
latency over that store, faiss vs numpy.  Writes its table into BENCHMARKS.md.

    python scripts/bench_cache.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import sys
import tempfile
import time
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, table, timed, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.gradients import GradientComputer  # noqa: E402
from trainfluence.objective import FunctionalModel, Objective  # noqa: E402
from trainfluence.projection import ProjectionSpec, Projector  # noqa: E402
from trainfluence.search import GradientIndex, brute_force_top_k, recall_at_k  # noqa: E402
from trainfluence.settings.influence import SearchSettings, StoreSettings  # noqa: E402
from trainfluence.factored import FactoredProjector, factored_layout  # noqa: E402
from trainfluence.models import build_model  # noqa: E402
from trainfluence.store import build_store  # noqa: E402
from trainfluence.store.build import FACTORED_BATCH, block_energies  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402


def fwd_bwd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> None:
    """A plain training step's forward and backward (no optimiser step) over x at batch size ``bs``."""
    for i in range(0, len(x), bs):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[i : i + bs]), y[i : i + bs]).backward()


def fwd_bwd_rate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, repeats: int = 2) -> float:
    """Examples/s of :func:`fwd_bwd` at batch size ``bs``."""
    return len(x) / timed(lambda: fwd_bwd(net, x, y, bs), repeats=repeats)


def paired_rates(fns: dict[str, Callable[[], object]], n: int, rounds: int = 3
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Examples/s of each of ``fns`` (each processes ``n`` examples), run in turn round after round (the order
    reversed every other round, after one untimed round) so that drift in the machine's speed hits all alike.
    Returns the median rate per function and ratios[ref][name]: the median over rounds of name's rate ÷ ref's."""
    names = list(fns)
    for name in names:
        fns[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - start)
    rates = {name: n / float(np.median(ts)) for name, ts in seconds.items()}
    ratios = {ref: {name: float(np.median([a / b for a, b in zip(seconds[ref], ts)])) for name, ts in seconds.items()}
              for ref in names}
    return rates, ratios


def factored_rate(fm: FunctionalModel, computer: GradientComputer, source, x: torch.Tensor, y: torch.Tensor, k: int,
                  repeats: int = 2) -> float:
    """Examples/s of the factored Kronecker projection to k (one batched forward/backward per batch), the store's
    layout and batch.  (Its output has at most k coordinates: each layer's k_out·k_in rounds down.)"""
    proj = FactoredProjector(fm, Objective(), factored_layout(fm, k, block_energies(fm, computer, source)))
    assert proj.dim <= k, (proj.dim, k)

    def run():
        for i in range(0, len(x), FACTORED_BATCH):
            proj.per_example(x[i : i + FACTORED_BATCH], y[i : i + FACTORED_BATCH])
    return len(x) / timed(run, repeats=repeats)


def countsketch_rate(fm: FunctionalModel, computer: GradientComputer, x: torch.Tensor, y: torch.Tensor, k: int,
                     repeats: int = 2) -> float:
    """Examples/s of vmap per-example gradients + CountSketch to k (the store's default path)."""
    proj = Projector(ProjectionSpec(k, 0, "countsketch"), fm.sizes, fm.device)

    def run():
        with torch.no_grad():
            for eg in computer.batches(x, y):
                proj.project_blocks([eg.grads[n] for n in fm.names])
    return len(x) / timed(run, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--n", type=int, default=60000, help="training images stored (default all 60,000)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=4096, help="examples in the throughput comparison")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--resnet-n", type=int, default=256, help="shapes images in the resnet18 comparison")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the paired model-size comparison")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cache_"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    cfg = DataConfig("mnist", data_root=args.data_root, train_size=args.n, test_size=1000)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    print(f"training the default CNN for 1 epoch on {len(train_set)} MNIST images …", flush=True)
    train(TrainConfig(epochs=1), train_set, test_set, work / "run", device)
    model = load_checkpoint(work / "run" / "final.pt", device=device).model

    # ---- throughput comparison on the same examples ---------------------------------------------------
    x, y = train_set.tensors(slice(0, args.micro), device)
    fm = FunctionalModel(model, "all")
    computer = GradientComputer(fm, Objective())
    vb = computer.batch_size(x[0])
    net = load_checkpoint(work / "run" / "final.pt", device=device).model.eval()
    # the factored pass runs channels-last on the CPU (FactoredProjector): the same model so converted is the
    # second reference, a training loop that itself runs channels-last
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)

    sizes = (32, 64, 128, 256)
    fb = {bs: fwd_bwd_rate(net, x, y, bs) for bs in sizes}
    best_bs = max(fb, key=fb.get)

    def vmap_only():
        with torch.no_grad():
            for _ in computer.batches(x, y):
                pass

    countsketch = Projector(ProjectionSpec(args.k, 0, "countsketch"), fm.sizes, device)
    gaussian = Projector(ProjectionSpec(args.k, 0, "gaussian"), fm.sizes, device)

    def vmap_proj(proj: Projector, xs, ys):
        def run():
            with torch.no_grad():
                for eg in computer.batches(xs, ys):
                    proj.project_blocks([eg.grads[n] for n in fm.names])
        return run

    t_vmap = len(x) / timed(vmap_only, repeats=2)
    t_cs = countsketch_rate(fm, computer, x, y, args.k)
    sweep = {}
    for bs in sizes:
        sized = GradientComputer(fm, Objective(), batch_size=bs)

        def run(sized=sized):
            with torch.no_grad():
                for eg in sized.batches(x, y):
                    countsketch.project_blocks([eg.grads[n] for n in fm.names])

        sweep[bs] = len(x) / timed(run, repeats=2)
    m = min(1024, len(x))
    t_gauss = m / timed(vmap_proj(gaussian, x[:m], y[:m]), repeats=1)
    loop_n = 256
    params = [p for p in net.parameters()]

    def loop():
        for i in range(loop_n):
            torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)

    t_loop = loop_n / timed(loop, repeats=1)

    # ---- the full store ----------------------------------------------------------------------------------
    cache = work / "cache"
    settings = StoreSettings(params="all", projection_dim=args.k)
    start = time.perf_counter()
    report = build_store(model, train_set, settings=settings, cache_dir=cache, device=device)
    build_s = time.perf_counter() - start
    store = report.store
    size_mib = store.size_bytes() / 2**20

    kron_settings = StoreSettings(params="all", projection_dim=args.k, projection="kronecker")
    start = time.perf_counter()
    kron_report = build_store(model, train_set, settings=kron_settings, cache_dir=work / "cache-kron", device=device)
    kron_build_s = time.perf_counter() - start
    kron_mib = kron_report.store.size_bytes() / 2**20
    # the whole factored build against a plain forward+backward pass over the same images, paired over rounds
    all_x, all_y = train_set.tensors(slice(0, len(train_set)), device)
    rounds = itertools.count()

    def full_build():
        folder = work / f"cache-kron-{next(rounds)}"
        build_store(model, train_set, settings=kron_settings, cache_dir=folder, device=device)
        shutil.rmtree(folder)

    full = {"fb": lambda: fwd_bwd(net, all_x, all_y, best_bs), "fb_cl": lambda: fwd_bwd(net_cl, all_x, all_y, best_bs),
            "build": full_build}
    build_rates, build_ratios = paired_rates(full, len(train_set), rounds=2)

    # ---- throughput against k, and against model size ----------------------------------------------------------
    print("throughput against k …", flush=True)
    rates = {k: (factored_rate(fm, computer, train_set, x, y, k), countsketch_rate(fm, computer, x, y, k))
             for k in sorted({1024, 4096, 16384, args.k})}
    k_rows = [[f"{k:,}", f, f / fb[best_bs], c, c / fb[best_bs]] for k, (f, c) in rates.items()]
    print("resnet18 at 32x32 …", flush=True)
    shapes = load_dataset(DataConfig("shapes", train_size=args.resnet_n, test_size=16, image_size=32), "train")
    rx, ry = shapes.tensors(slice(0, args.resnet_n), device)
    resnet = build_model("resnet18", num_classes=shapes.num_classes, in_channels=3, image_size=32).to(device).eval()
    r_fm = FunctionalModel(resnet, "all")
    r_computer = GradientComputer(r_fm, Objective())
    r_sweep = {bs: fwd_bwd_rate(resnet, rx, ry, bs, repeats=1) for bs in (32, 64, 128)}
    r_best = max(r_sweep, key=r_sweep.get)
    size_rows = []
    resnet_cl = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    for label, net_, converted, fm_, comp_, src, xs, ys, bs in [
            (f"default CNN, MNIST 28×28 ({fm.dim:,} parameters)", net, net_cl, fm, computer, train_set, x, y, best_bs),
            (f"resnet18, shapes 32×32 ({r_fm.dim:,} parameters)", resnet, resnet_cl, r_fm, r_computer, shapes, rx, ry,
             r_best)]:
        proj = FactoredProjector(fm_, Objective(), factored_layout(fm_, args.k, block_energies(fm_, comp_, src)))
        sketch = Projector(ProjectionSpec(args.k, 0, "countsketch"), fm_.sizes, fm_.device)

        def factored(proj=proj, xs=xs, ys=ys):
            for i in range(0, len(xs), FACTORED_BATCH):
                proj.per_example(xs[i : i + FACTORED_BATCH], ys[i : i + FACTORED_BATCH])

        def vmap_sketch(comp_=comp_, sketch=sketch, fm_=fm_, xs=xs, ys=ys):
            with torch.no_grad():
                for eg in comp_.batches(xs, ys):
                    sketch.project_blocks([eg.grads[n] for n in fm_.names])

        r, q = paired_rates({"fb": lambda n=net_, xs=xs, ys=ys, bs=bs: fwd_bwd(n, xs, ys, bs),
                             "fb_cl": lambda n=converted, xs=xs, ys=ys, bs=bs: fwd_bwd(n, xs, ys, bs),
                             "factored": factored, "vmap": vmap_sketch}, len(xs), args.rounds)
        size_rows.append([label, bs, r["fb"], r["fb_cl"], r["factored"], q["fb"]["factored"], q["fb_cl"]["factored"],
                          r["vmap"], q["fb"]["vmap"]])

    # ---- queries ---------------------------------------------------------------------------------------
    tx, ty = test_set.tensors(slice(0, 20), device)
    queries = countsketch.project(computer.flat(tx, ty)).cpu().numpy()
    matrix = store.read()
    exact = brute_force_top_k(matrix, queries, 10)

    def latency(idx: GradientIndex) -> tuple[float, float]:
        """ms for one test point's helpful and harmful top-10 (one call), and per test point in a batch of 20."""
        one = timed(lambda: [idx.search(q[None], 10) for q in queries], repeats=2) / len(queries)
        batched = timed(lambda: idx.search(queries, 10), repeats=2) / len(queries)
        return one * 1e3, batched * 1e3

    def numpy_top10(qs):
        s = qs @ matrix.T
        for row in s:
            for sign in (1, -1):
                top = np.argpartition(-sign * row, 10)[:10]
                top[np.argsort(-sign * row[top])]

    np_one = timed(lambda: [numpy_top10(q[None]) for q in queries], repeats=2) / len(queries) * 1e3
    np_batch = timed(lambda: numpy_top10(queries), repeats=2) / len(queries) * 1e3
    query_rows = [["numpy brute force (float32 matrix in RAM)", np_one, np_batch, 1.0, 1.0, 0.0]]
    for label, settings_ in [("faiss IndexFlatIP (exact, default)", SearchSettings("flat")),
                             ("faiss IndexScalarQuantizer fp16 (`--index fp16`)", SearchSettings("fp16")),
                             *[(f"faiss IVF, nprobe {p}", SearchSettings("ivf", nprobe=p)) for p in (8, 32, 128)]]:
        t0 = time.perf_counter()
        idx = GradientIndex(store, settings_)
        build = time.perf_counter() - t0
        got = idx.search(queries, 10)
        if settings_.kind == "ivf":
            label += f" (nlist {idx._nlist()})"
        query_rows.append([label, *latency(idx), recall_at_k(got.largest_index, exact.largest_index),
                           recall_at_k(got.smallest_index, exact.smallest_index), build])

    fb_vb = fb.get(vb) or fwd_bwd_rate(net, x, y, vb)
    rows = [
        [f"batched forward+backward, batch {vb} (same batch as the store)", fb_vb, 1.0],
        [f"batched forward+backward, best batch ({best_bs})", fb[best_bs], fb[best_bs] / fb_vb],
        ["per-example autograd loop", t_loop, t_loop / fb_vb],
        [f"torch.func vmap(grad), batch {vb}, no projection", t_vmap, t_vmap / fb_vb],
        [f"vmap + CountSketch to k={args.k}", t_cs, t_cs / fb_vb],
        [f"vmap + dense Gaussian to k={args.k}", t_gauss, t_gauss / fb_vb],
        [f"store build, all {store.n} images (vmap + CountSketch + fp16 write + checksums)", report.throughput, report.throughput / fb_vb],
        [f"store build, all {store.n} images, factored Kronecker projection (`--projection kronecker`)",
         kron_report.throughput, kron_report.throughput / fb_vb],
    ]
    body = f"""### Gradient store: throughput, size, queries (MNIST, default CNN, {fm.dim:,} parameters)

Per-example gradient throughput, examples/s (ratios against batched forward+backward at the store's batch
size, all measured in this run on the same {len(x)} images; the store build row covers all {store.n}):

{table(["method", "examples/s", "× forward+backward"], rows)}

Against the best batched forward+backward of any batch size the store build runs at
{report.throughput / fb[best_bs]:.2f}×.  Batch-size sweep, examples/s (forward+backward | vmap + CountSketch):
{", ".join(f"{bs}: {fb[bs]:,.0f} | {sweep[bs]:,.0f}" for bs in sizes)}.  Projection overhead (CountSketch vs no projection):
{(t_vmap / t_cs - 1) * 100:.0f}% of the gradient time; the dense Gaussian costs {t_vmap / t_gauss:.1f}× the gradient time.

Store of all {store.n:,} training images at k = {args.k} (fp16): built in {build_s:.1f} s with CountSketch,
{kron_build_s:.1f} s with the factored Kronecker projection; {size_mib:.0f} / {kron_mib:.0f} MiB on disk.
The factored build measured paired with a plain forward+backward pass over the same {store.n:,} images (batch
{best_bs}; in turn, 2 rounds after an untimed one, order reversed in the second): {build_rates["build"]:,.0f} vs
{build_rates["fb"]:,.0f} examples/s, **{build_ratios["fb"]["build"]:.2f}×** (median of the per-round ratios).  The
factored pass runs channels-last on the CPU (its own copies of the weights; the model is untouched); against
the same training step with the model itself converted to channels-last ({build_rates["fb_cl"]:,.0f} examples/s, in
the same rounds) it runs at {build_ratios["fb_cl"]["build"]:.2f}×.

Throughput against k on the same {len(x)} images (examples/s, and × the best batched forward+backward,
batch {best_bs}):

{table(["k", "factored Kronecker", "×", "vmap + CountSketch", "×"], k_rows)}

Against model size, k = {args.k}, measured paired: the four run in turn for {args.rounds} rounds (order reversed
every other round) on the same images — {len(x)} MNIST images for the CNN, {args.resnet_n} shapes images at 32×32 for
resnet18 (eval mode; its convolutions and classifier take the factored path, its BatchNorm parameters per-example
gradients from the same hooks); rates are medians, × is the median over rounds of the per-round ratio to the
forward+backward of a plain training step (zero_grad, forward, backward) at its fastest batch of 32, 64, 128 (shown;
resnet18 sweep: {", ".join(f"{bs}: {r:.1f}" for bs, r in r_sweep.items())} ex/s), and (× CL) to the same step with the
model converted to channels-last; the factored path runs at the store's batch, {FACTORED_BATCH}:

{table(["model", "forward+backward batch", "forward+backward ex/s", "same, channels-last ex/s", "factored Kronecker ex/s",
        "×", "× CL", "vmap + CountSketch ex/s", "×"], size_rows)}

Query latency over that store: the 10 most helpful and the 10 most harmful training images of one test point
(one query vector s_test; both lists), alone and per test point when 20 test points are asked at once:

{table(["search", "ms, one test point", "ms per test point, batch of 20", "recall@10 helpful", "recall@10 harmful", "index build s"],
       query_rows)}
"""
    print(body)
    update_section("cache", body)


if __name__ == "__main__":
    main()
