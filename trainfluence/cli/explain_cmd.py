"""``trainfluence explain``: the training images that most helped and most hurt chosen predictions."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..settings import Range
from ..settings.influence import InfluenceSettings, StoreSettings
from .common import add_checkpoint_args, add_device_arg, add_out_arg, check_indices, load_checkpoint_and_data, prepare_out
from .flags import alias, number, settings_from
from .influence_args import add_influence_args, engine_from_args, solver_options

HELP = "rank the training images by their influence on test predictions (most helpful and most harmful)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help=HELP, description=HELP + ". Writes influence.json, PNG grids and index.html.")
    add_checkpoint_args(p, several=True)
    index = number(Range(low=0, integer=True), "--index")
    p.add_argument("--index", dest="index", type=index, nargs="+", default=None, metavar="I",
                   help="image(s) of --split to explain (required)")
    alias(p, "--test-index", "--index", dest="index", type=index, nargs="+")
    p.add_argument("--split", default="test", choices=["test", "train"], help="which split --index refers to (default test)")
    top = number(Range(low=1, high=10_000, integer=True), "--top")
    p.add_argument("--top", dest="top", type=top, default=10,
                   help="how many helpful and harmful training images (default 10; pictures show the first 20)")
    alias(p, "--k", "--top", dest="top", type=top)
    p.add_argument("--pixels", action="store_true", help="also draw each shown training image's I_pert,loss pixel map")
    add_out_arg(p, "runs/explain")
    add_influence_args(p)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.index is None:
        raise UserError("explain needs --index I [I ...]: the images of --split to explain")
    solver_options(args, settings_from(args, InfluenceSettings).solver)
    settings_from(args, StoreSettings)
    from ..audit.review import default_review, label_marks
    from ..explain import explain
    from ..solvers.base import SolveReport

    ckpt, train, test, device = load_checkpoint_and_data(args)
    data = test if args.split == "test" else train
    check_indices(args.index, len(data), "--index", f"the {args.split} split")
    out = prepare_out(args.out)
    engine = engine_from_args(args, ckpt, train, device)
    rev = default_review(ckpt, train, device, args.arch)  # mark suspects (and planted flips) wherever shown
    marks = label_marks(train, rev)
    report = explain(engine, train, data, args.index, min(args.top, len(train)), out, pixels=args.pixels, marks=marks)
    for item in report["explanations"]:
        t = item["test"]
        print(f"{args.split} #{t['index']} ({t['label_name']}, predicted {t['prediction_name']} {t['probability']:.2f}):")
        print("  most helpful: " + ", ".join(f"#{e['index']} {e['label_name']} ({e['score']:.3g})" for e in item["helpful"][:5]))
        print("  most harmful: " + ", ".join(f"#{e['index']} {e['label_name']} ({e['score']:.3g})" for e in item["harmful"][:5]))
    for solve in dict.fromkeys(SolveReport(**r).describe() for r in report["solves"]):  # once each, in order
        print(f"solve: {solve}")
    store = engine.build_report
    print(f"gradient store{'s' if len(args.checkpoint) > 1 else ''} {store.store.root}: " +
          ("reused (no gradient pass)" if store.reused else f"built {store.built_chunks} chunk(s)"))
    shown = {e["index"] for item in report["explanations"] for kind in ("helpful", "harmful") for e in item[kind]}
    flagged = sum(1 for i in shown if i in marks)
    print(f"label check: {flagged} of the {len(shown)} training images shown are planted flips or audit suspects "
          + (f"(the audit's default ranking, top {rev.estimate.count})" if not rev.estimate.refusal else
             "(no audit suspects: the noise rate was not estimated)") + "; marked on the pages")
    print(f"wrote {out / 'influence.json'}, {len(report['explanations'])} PNG grid(s) and {out / 'index.html'}")
    return 0

