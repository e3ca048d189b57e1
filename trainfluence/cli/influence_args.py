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


def solver_options(args: argparse.Namespace, solver: str) -> Any:
    """The settings of the solver whose flags were given (None: none given, its defaults).  Flags of a solver other
    than ``--solver`` are an error (they would be silently ignored); with ``--solver auto`` flags of one solver may
    be given, and the engine refuses them if auto chooses another solver for the model."""
    flagged = {name: mine for name, cls in SOLVER_SETTINGS.items() if (mine := given(args, cls, dest_prefix=f"{name}__"))}
    wrong = [name for name in flagged if name != solver] if solver != "auto" else list(flagged)[1:]
    if wrong:
        flag = "--" + wrong[0] + "-" + next(iter(flagged[wrong[0]])).replace("_", "-")
        raise UserError(f"{flag} applies to --solver {wrong[0]}, but the solver is {solver}: drop it or pass "
                        f"--solver {wrong[0]}")
    owner = next(iter(flagged), None)
    return SOLVER_SETTINGS[owner](**flagged[owner]) if owner else None


def engine_from_args(args: argparse.Namespace, ckpt: Any, train: Any, device: Any) -> Any:
    """The engine the flags ask for — an ensemble when several --checkpoint are given.  Its plan (the resolved
    settings and the estimated cost) is printed before any long work starts."""
    from ..checkpoint import load_checkpoint
    from ..ensemble import EnsembleEngine
    from ..influence import InfluenceEngine
    from ..progress import note

    settings = settings_from(args, InfluenceSettings)
    options = solver_options(args, settings.solver)
    options = dict(settings=settings, store=settings_from(args, StoreSettings), solver_settings=options,
                   cache_dir=args.cache_dir, device=device)
    paths = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    if len(paths) == 1:
        engine = InfluenceEngine(ckpt, train, **options)
    else:
        others = [load_checkpoint(p, device=device, arch=args.arch) for p in paths[1:]]
        for other, path in zip(others, paths[1:]):
            if (other.meta.arch, other.meta.classes, other.meta.image_size) != (ckpt.meta.arch, ckpt.meta.classes,
                                                                              ckpt.meta.image_size):
                raise UserError(f"{path} is not a checkpoint of the same architecture and classes as {paths[0]}: an "
                                "ensemble averages models of one kind")
        engine = EnsembleEngine([ckpt, *others], train, **options)
    note(engine.plan())
    return engine
