"""``trainfluence cache``: build (or finish, or reuse) the per-example gradient store of a checkpoint."""

from __future__ import annotations

import argparse

from .. import distributed
from ..objective import Objective
from ..store import StoreSettings, build_store, parse_shard
from .common import add_data_args, add_device_arg, load_checkpoint_and_data

HELP = "compute per-example loss gradients once and store them on disk (resumable, sharded, optionally projected)"


def add_store_args(p: argparse.ArgumentParser, params_default: str = "all") -> None:
    d = StoreSettings()
    g = p.add_argument_group("gradient store")
    g.add_argument("--params", default=params_default, help=f"all | last | comma-separated module names (default {params_default})")
    g.add_argument("--project-dim", type=int, default=None, metavar="K", help="random projection to K dimensions (default: none)")
    g.add_argument("--project-seed", type=int, default=d.project_seed, help="projection seed (default 0)")
    g.add_argument("--projection", default=d.projection, choices=["countsketch", "gaussian"],
                   help="countsketch: O(p) sparse sign sketch (default); gaussian: dense, for comparison")
    g.add_argument("--projection-allocation", default=d.projection_allocation, choices=["energy", "uniform"],
                   help="energy: output dims per parameter block ∝ its gradient energy, small blocks exact (default); "
                        "uniform: one sketch of the whole vector")
    g.add_argument("--dtype", default=None, choices=["fp16", "fp32"], help="stored precision (default fp16 when projected, else fp32)")
    g.add_argument("--chunk-size", type=int, default=d.chunk_size, help=f"rows per resumable chunk (default {d.chunk_size})")
    g.add_argument("--memory-budget", type=int, default=d.memory_budget >> 20, metavar="MB",
                   help=f"working memory for one vmap batch (default {d.memory_budget >> 20})")
    g.add_argument("--cache-dir", default="cache", help="where stores live (default cache/)")


def store_settings(args: argparse.Namespace) -> StoreSettings:
    return StoreSettings(params=args.params, project_dim=args.project_dim, project_seed=args.project_seed,
                         projection=args.projection, projection_allocation=args.projection_allocation, dtype=args.dtype, chunk_size=args.chunk_size,
                         memory_budget=args.memory_budget << 20)


def objective_for(args: argparse.Namespace, ckpt) -> Objective:
    wd = getattr(args, "weight_decay", None)
    return Objective(weight_decay=ckpt.meta.weight_decay if wd is None else wd)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help=HELP, description=HELP + ". Under torchrun every rank builds its shard.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    add_data_args(p, from_checkpoint=True)
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to store (default train)")
    add_store_args(p)
    p.add_argument("--shard", default=None, metavar="i/n", help="build only the i-th of n contiguous slices (default: all)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = store_settings(args)
    settings.validate()
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    ckpt, train, test, device = load_checkpoint_and_data(args)
    ranks = distributed.init(device)
    if ranks is not None:
        shard, device = ranks, distributed.local_device(device)
    data = train if args.split == "train" else test
    report = build_store(ckpt.model, data, objective=objective_for(args, ckpt), settings=settings,
                         cache_dir=args.cache_dir, split=args.split, shard=shard, device=device)
    store = report.store
    if ranks is not None:
        distributed.finish()
        if ranks[0] != 0:
            return 0
    done = store.num_chunks - len(store.missing_chunks(verify=False))
    what = f"built {report.built_chunks} chunk(s)" + (f" ({report.rebuilt_chunks} failed their checksum)" if report.rebuilt_chunks else "")
    if report.built_chunks == 0:
        what = "reused (all chunks present and verified)"
    print(f"gradient store: {store.root}")
    print(f"  {store.n} examples x {store.dim} dims ({store.key['dtype']}), {store.size_bytes() / 2**20:.1f} MiB, "
          f"{done}/{store.num_chunks} chunks complete; {what}")
    if report.examples:
        print(f"  throughput {report.throughput:.0f} examples/s ({report.examples} examples in {report.seconds:.1f} s)")
    return 0
