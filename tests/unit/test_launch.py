"""accelerate's state is per process: each run gets its own mixed precision, whatever ran before it."""

from __future__ import annotations

import torch

from multitune.recipe.launch import fresh_accelerator


def test_each_run_gets_its_own_mixed_precision_in_one_process():
    bf16 = fresh_accelerator("bf16", cpu=True)
    assert bf16.mixed_precision == "bf16"
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
    plain = fresh_accelerator("no", cpu=True)  # accelerate alone refuses this, or keeps bf16 when none is named
    assert plain.mixed_precision == "no"
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert fresh_accelerator("bf16", cpu=True).mixed_precision == "bf16"
    fresh_accelerator("no", cpu=True)  # leave the process as the other tests expect it
