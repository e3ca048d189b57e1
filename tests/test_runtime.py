"""The allocator thresholds the command line fixes at start (trainfluence/runtime.py), checked through glibc's own
accounting of mmapped blocks, in fresh processes (the setting is process-wide)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest


def glibc_with_mallinfo2() -> bool:
    """The thresholds are glibc's; the probe reads mallinfo2 (glibc ≥ 2.33)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


pytestmark = pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc ≥ 2.33 (mallopt, mallinfo2)")

# mallinfo2().hblks counts the blocks glibc currently serves by mmap; a block below the threshold comes from the heap
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mmapped(mib):
        before = libc.mallinfo2().hblks
        block = libc.malloc(mib << 20)
        after = libc.mallinfo2().hblks
        libc.free(block)
        return after - before

    out = {"before": mmapped(4)}
    from trainfluence.runtime import allocator_state, tune_allocator
    out["tuned"] = tune_allocator()
    out["again"] = tune_allocator()
    out["state"] = allocator_state()
    out["after_4"], out["after_16"], out["after_64"] = mmapped(4), mmapped(16), mmapped(64)
    print(json.dumps(out))
""")


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TRAINFLUENCE_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_thresholds_fixed_move_mid_size_blocks_from_mmap_to_the_heap():
    out = probe()
    assert out["before"] == 1  # glibc's start threshold is 128 KiB: a 4 MiB block is mmapped
    assert out["tuned"] is True and out["again"] is True
    assert "mmap 32 MiB" in out["state"]
    assert (out["after_4"], out["after_16"]) == (0, 0)  # below 32 MiB: from the heap, reused batch after batch
    assert out["after_64"] == 1  # above it (a store chunk, a dataset tensor): still mmapped, returned when freed


@pytest.mark.parametrize("env, why", [({"TRAINFLUENCE_MALLOC": "default"}, "TRAINFLUENCE_MALLOC=default"),
                                      ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "MALLOC_*_THRESHOLD_")])
def test_left_alone_when_the_user_says_so(env, why):
    out = probe(**env)
    assert out["tuned"] is False and why in out["state"]
    # glibc's own rule: at most the freed 4 MiB block raised the threshold, so a 16 MiB block is still mmapped
    assert out["after_16"] == 1


def test_the_command_line_tunes_before_it_runs(monkeypatch):
    from trainfluence import cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(True) or True)
    assert cli.main(["train", "--dataset", "nonsense"]) == 2
    assert calls == [True]
