"""``trainfluence cache``: build (or finish, or reuse) the per-example gradient store of a checkpoint — the same
store ``explain`` and ``audit`` use with the same flags (they share their defaults)."""

from __future__ import annotations

import argparse

from ..settings.influence import StoreSettings
from .common import add_checkpoint_args, add_device_arg, load_checkpoint_and_data
from .flags import settings_from
from .influence_args import add_store_args

HELP = "compute per-example loss gradients once and store them on disk (resumable, sharded, optionally projected)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help=HELP, description=HELP + ". Under torchrun every rank builds its shard.")
    add_checkpoint_args(p)
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to store (default train)")
    add_store_args(p)
    p.add_argument("--shard", default=None, metavar="i/n", help="build only the i-th of n contiguous slices (default: all)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, StoreSettings)
    from .. import distributed
    from ..store import build_store, parse_shard

    shard = parse_shard(args.shard) if args.shard else (0, 1)
    ckpt, train, test, device = load_checkpoint_and_data(args)
    ranks = distributed.init(device)
    if ranks is not None:
        shard, device = ranks, distributed.local_device(device)
    data = train if args.split == "train" else test
    report = build_store(ckpt.model, data, settings=settings, cache_dir=args.cache_dir, split=args.split, shard=shard,
                         device=device, model_id=ckpt.content_hash)
    store = report.store
    if ranks is not None:
        distributed.finish()
        if ranks[0] != 0:
            return 0
    done = store.num_chunks - len(store.missing_chunks(verify=False))
    what = f"built {report.built_chunks} chunk(s)" + (f" ({report.rebuilt_chunks} failed their checksum)" if report.rebuilt_chunks else "")
    if report.reused:
        what = "reused (all chunks present and verified; no gradient pass)"
    print(f"gradient store: {store.root}")
    print(f"  {store.n} examples x {store.dim} dims ({store.key['dtype']}, parameters: {settings.params}), "
          f"{store.size_bytes() / 2**20:.1f} MiB, {done}/{store.num_chunks} chunks complete; {what}")
    if report.examples:
        print(f"  throughput {report.throughput:.0f} examples/s ({report.examples} examples in {report.seconds:.1f} s)")
    return 0
