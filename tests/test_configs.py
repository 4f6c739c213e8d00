"""Every shipped config loads; its data reads; and (slow) its model builds."""

from pathlib import Path

import pytest

from multitune.catalogue import load_config
from multitune.data.tasks import load_tasks
from multitune.models.backbone import packaged_copy
from tests.conftest import REPO, SHARED_DATA

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def needs_shared_data(path: Path) -> bool:
    return "shared/data" in path.read_text(encoding="utf-8")


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "eight_real_tasks.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_data_reads(path):
    if needs_shared_data(path) and not SHARED_DATA.is_dir():
        pytest.skip("the shared data folder is not beside the project")
    config = load_config(path)
    data = load_tasks(config.tasks, config.run.seed)
    assert set(data) == set(config.tasks)
    assert all(task.splits["train"] and task.splits["validation"] for task in data.values())


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_its_model(path):
    from multitune.recipe.prepare import prepare

    if needs_shared_data(path) and not SHARED_DATA.is_dir():
        pytest.skip("the shared data folder is not beside the project")
    if packaged_copy("sentence-transformers/all-MiniLM-L6-v2") is None:
        pytest.skip("the offline MiniLM package is not installed")
    config = load_config(path)
    prepared = prepare(config)
    assert set(prepared.model.heads) == set(config.tasks)
    assert all(prepared.encoded[name]["train"] for name in config.tasks)
