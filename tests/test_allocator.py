"""wcam.tune_malloc: glibc keeps freed tensor memory mapped, and the command line applies it unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import wcam
import wcam.allocator
from wcam.cli import main

# Allocates and frees a 48 MiB tensor 20 times (above glibc's largest dynamic mmap threshold, 32 MiB) and
# prints the minor page faults that took: 12,288 pages a time when each allocation is a fresh mapping.
FAULTS = """
import resource, sys, torch, wcam
if sys.argv[1] == "tuned":
    assert wcam.tune_malloc()
torch.ones(12 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(12 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# The environment variables the README gives for a server that cannot call tune_malloc: the same settings.
SAME_BY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824",
                       "MALLOC_ARENA_MAX": "1"}


def _faults(mode: str, environment: dict[str, str] | None = None) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(environment or {})})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only (CI is Linux)")
def test_tuned_malloc_stops_refaulting_large_tensors():
    """Untuned, every allocation faults its pages in again (12,288 4 KiB pages each; fewer, but still 20
    times as many as tuned, with transparent huge pages); tuned, the heap grows once and is reused (measured:
    12,288 faults in all)."""
    untuned, tuned = _faults("system"), _faults("tuned")
    by_environment = _faults("system", SAME_BY_ENVIRONMENT)
    assert untuned >= 10 * max(tuned, 1)
    assert tuned <= 2 * 12_288
    assert by_environment <= 2 * 12_288


@pytest.mark.parametrize("retain, error", [(0, ValueError), (-1, ValueError), (2**31, ValueError),
                                           (1.5, TypeError), (True, TypeError)])
def test_tune_malloc_rejects_bad_sizes(retain, error):
    with pytest.raises(error, match="retain_bytes"):
        wcam.tune_malloc(retain)


@pytest.mark.parametrize("argv, tuned, code", [
    (["bench", "--help"], 0, 0),
    (["--system-malloc", "explain", "x.png"], 0, 1),
    (["explain", "--system-malloc", "x.png"], 0, 1),
    (["explain", "x.png"], 1, 1),
])
def test_cli_tunes_malloc_unless_told_not_to(argv, tuned, code, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(wcam.allocator, "tune_malloc", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)  # x.png does not exist: the command fails after the set-up, nothing is run
    assert main(argv) == code  # 1: the missing file, so --system-malloc was parsed in either place
    assert len(calls) == tuned
