"""The per-example gradient store: its on-disk format (:mod:`.format`), its build (:mod:`.build`) and the cached
results kept beside it — s_test vectors (:mod:`.stest`), Kronecker-factored curvature fits (:mod:`.curvature`) and
faiss indices (:mod:`trainfluence.search`)."""

from .build import BuildReport, build_store, parse_shard
from .format import CorruptStore, GradientStore, open_store, store_key, store_root

__all__ = ["BuildReport", "CorruptStore", "GradientStore", "build_store", "open_store", "parse_shard", "store_key",
           "store_root"]
