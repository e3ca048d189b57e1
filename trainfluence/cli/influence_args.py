"""Options of the influence engine, shared by ``explain`` and ``audit``; one flag per solver setting, generated
from each solver's settings dataclass (``--lissa-depth``, ``--arnoldi-rank``, ``--cg-maxiter`` …)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..influence import InfluenceEngine
from ..solvers import SOLVERS
from .cache_cmd import add_store_args, store_settings


def _parse_value(default: Any):
    if isinstance(default, bool):
        return lambda text: text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if default is None:
        return lambda text: None if text.lower() == "none" else int(text)
    return lambda text: text if text == "auto" else float(text)  # e.g. LiSSA's scale: a number or "auto"


def add_influence_args(p: argparse.ArgumentParser, *, solver: str, damping: float, params: str,
                       hessian_samples: int | None) -> None:
    add_store_args(p, params_default=params)
    g = p.add_argument_group("influence")
    g.add_argument("--solver", default=solver, choices=list(SOLVERS), help=f"inverse-HVP solver (default {solver})")
    g.add_argument("--damping", type=float, default=damping, help=f"λ in H = ∇²L + λI (default {damping})")
    g.add_argument("--weight-decay", type=float, default=None, help="wd of the objective (default: the checkpoint's)")
    g.add_argument("--hessian-samples", type=int, default=hessian_samples,
                   help=f"build H from this many random training examples (default {hessian_samples or 'all'})")
    for name, (_cls, settings_cls) in SOLVERS.items():
        sg = p.add_argument_group(f"{name} solver")
        for f in dataclasses.fields(settings_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            sg.add_argument(f"--{name}-{f.name.replace('_', '-')}", dest=f"{name}__{f.name}", type=_parse_value(default),
                            default=None, metavar=f.name.upper(), help=f"(default {default})")


def solver_settings(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"{args.solver}__"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def engine_from_args(args: argparse.Namespace, ckpt, train, device) -> InfluenceEngine:
    wd = ckpt.meta.weight_decay if args.weight_decay is None else args.weight_decay
    return InfluenceEngine(ckpt.model, train, solver=args.solver, damping=args.damping, weight_decay=wd,
                           solver_settings=solver_settings(args), hessian_samples=args.hessian_samples,
                           store_settings=store_settings(args), cache_dir=args.cache_dir, device=device)
