"""A command launched as several processes leaves the process group before the interpreter exits: a gloo
group left to the exit's destructors can abort a process that finished its work (SIGABRT, "terminate called
without an active exception"), failing a run that trained well."""

import socket

import pytest
import torch.distributed as dist

from multitune import cli
from multitune.core.processes import end_process_group


@pytest.fixture
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("wait", [True, False])
def test_end_process_group_leaves_the_group(group, wait):
    assert dist.is_initialized()
    end_process_group(wait=wait)
    assert not dist.is_initialized()
    end_process_group(wait=wait)  # nothing left to leave: a no-op


def test_a_command_leaves_the_group_when_it_ends_well(group, capsys):
    assert cli.main(["list"]) == 0
    assert not dist.is_initialized()


def test_a_command_leaves_the_group_after_an_error(group, tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    assert not dist.is_initialized()
