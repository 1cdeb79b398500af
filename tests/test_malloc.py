"""dcdit.malloc: freed tensors' pages are reused instead of faulted in again (glibc only).

The probe runs in a fresh interpreter (the thresholds are process-wide and one-way) and counts the
minor page faults of allocating and filling a 64 MiB tensor, the size class of the study's sampling
activations: glibc maps such a block anew each time, so every one of its 16,384 pages faults."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dcdit import malloc

PROBE = """
import json, resource, sys, torch
from dcdit.malloc import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "tuned" else False
faults = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, every page touched
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def plain() -> dict:
    """glibc's default: every 64 MiB allocation is mapped afresh and faults all its pages again (16,384
    pages of 4 KiB; fewer faults, each of a huge page, where transparent huge pages are always on)."""
    p = probe("plain", DCDIT_MALLOC="")
    assert not p["applied"] and min(p["faults"][-8:]) > 0, p
    return p


@glibc
def test_freed_tensor_pages_are_reused_instead_of_faulted_again(plain):
    tuned = probe("tuned", DCDIT_MALLOC="")
    assert tuned["applied"]
    # once the heap has room (the first allocations grow it), the last ones fault almost nothing
    assert sum(tuned["faults"][-8:]) <= 0.05 * sum(plain["faults"][-8:]), (tuned, plain)


@glibc
def test_the_environment_keeps_glibcs_behaviour(plain):
    kept = probe("tuned", DCDIT_MALLOC="default")
    assert not kept["applied"]
    assert sum(kept["faults"][-8:]) >= 0.9 * sum(plain["faults"][-8:]), (kept, plain)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(malloc, "_applied", False)
    assert malloc.reuse_freed_memory() is False and malloc.applied() is False


def test_the_cli_applies_it_before_running_a_command(monkeypatch, capsys):
    from dcdit import cli

    calls = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["flops", "mnist"]) == 0
    assert calls == [True]
