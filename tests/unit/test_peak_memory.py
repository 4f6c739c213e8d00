"""Peak memory is each process's own, not what it inherited from the process that started it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from multitune.recipe.session import peak_memory_bytes

CHILD = (
    "import torch; from multitune.recipe.session import peak_memory_bytes; "
    "print(peak_memory_bytes(torch.device('cpu')))"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited high-water mark is Linux's")
def test_a_process_started_by_a_large_one_reports_its_own_peak():
    """The parent holds 1.5 GB of touched memory when it starts the child; the child (Python and torch, a few
    hundred MB) must report less than that. getrusage's ru_maxrss reported at least the parent's 1.5 GB."""
    held = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB of float32, every page written
    assert peak_memory_bytes(torch.device("cpu")) >= held.numel() * 4
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    child = int(out.strip().splitlines()[-1])
    assert 50 * 2**20 < child < 1024 * 2**20, child
    del held
