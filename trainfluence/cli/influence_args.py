"""Options of the influence engine, shared by ``cache``, ``explain`` and ``audit``: the store's, the engine's and
one flag per solver setting (``--lissa-depth``, ``--arnoldi-rank``, ``--cg-maxiter`` …), all generated from the
settings dataclasses, so the three commands and the Python API share one set of defaults."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from ..settings.influence import SOLVER_SETTINGS, InfluenceSettings, StoreSettings
from .flags import add_settings, given, settings_from


def add_store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gradient store")
    add_settings(g, StoreSettings)
    g.add_argument("--cache-dir", default="cache", metavar="DIR", help="where stores and cached s_test live (default cache/)")


def add_influence_args(p: argparse.ArgumentParser) -> None:
    add_store_args(p)
    add_settings(p.add_argument_group("influence"), InfluenceSettings)
    for name, cls in SOLVER_SETTINGS.items():
        add_settings(p.add_argument_group(f"{name} solver"), cls, prefix=f"{name}-", dest_prefix=f"{name}__")


def solver_options(args: argparse.Namespace, solver: str) -> dict[str, Any]:
    """The chosen solver's flags; a flag of another solver is an error (it would be silently ignored).  With
    ``--solver auto`` (resolved once the model is known) flags of at most one solver may be given."""
    flagged = {}
    for name, cls in SOLVER_SETTINGS.items():
        mine = given(args, cls, dest_prefix=f"{name}__")
        if mine:
            flagged[name] = mine
    for name, mine in flagged.items():
        if name != solver and (solver != "auto" or len(flagged) > 1):
            flag = "--" + name + "-" + next(iter(mine)).replace("_", "-")
            raise UserError(f"{flag} applies to --solver {name}, but the solver is {solver}: drop it or pass --solver {name}")
    return next(iter(flagged.values())) if solver == "auto" and flagged else flagged.get(solver, {})


def engine_from_args(args: argparse.Namespace, ckpt: Any, train: Any, device: Any) -> Any:
    """The engine the flags ask for — an ensemble when several --checkpoint are given."""
    from ..checkpoint import load_checkpoint
    from ..ensemble import EnsembleEngine
    from ..influence import InfluenceEngine

    from ..influence import resolve_solver
    from ..objective import FunctionalModel

    settings = settings_from(args, InfluenceSettings)
    store = settings_from(args, StoreSettings)
    options = solver_options(args, settings.solver)
    if settings.solver == "auto" and options:  # solver flags given with --solver auto: they must fit its choice
        chosen = resolve_solver("auto", FunctionalModel(ckpt.model, store.params))
        owner = next(n for n in SOLVER_SETTINGS if given(args, SOLVER_SETTINGS[n], dest_prefix=f"{n}__"))
        if owner != chosen:
            raise UserError(f"--{owner}-… flags were given, but --solver auto chose {chosen} for this model: pass "
                            f"--solver {owner} to use {owner}")
    options = dict(settings=settings, store=store, solver_settings=options, cache_dir=args.cache_dir, device=device)
    paths = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    if len(paths) == 1:
        return InfluenceEngine(ckpt, train, **options)
    others = [load_checkpoint(p, device=device, arch=args.arch) for p in paths[1:]]
    for other, path in zip(others, paths[1:]):
        if (other.meta.arch, other.meta.classes, other.meta.image_size) != (ckpt.meta.arch, ckpt.meta.classes, ckpt.meta.image_size):
            raise UserError(f"{path} is not a checkpoint of the same architecture and classes as {paths[0]}: an "
                            "ensemble averages models of one kind")
    return EnsembleEngine([ckpt, *others], train, **options)
