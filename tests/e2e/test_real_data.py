"""The readers against the real files of the shared data folder: every quirk, and the official row counts."""

import pytest

from multitune.catalogue import load_config
from multitune.data.tasks import load_tasks
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared data folder is not beside the project")

# Official sizes (each folder's SOURCE.md): train + carved validation, or the given splits.
EXPECTED = {
    "sst2": {"train+validation": 67_349, "test": 872},
    "cola": {"train+validation": 8_551, "test": 1_043},
    "mrpc": {"train": 3_668, "validation": 408, "test": 1_725},
    "rte": {"train+validation": 2_490, "test": 277},
    "stsb": {"train": 5_749, "validation": 1_500, "test": 1_379},
    "wnut17": {"train": 3_394, "validation": 1_009, "test": 1_287},
}


def test_eight_real_tasks_read_with_official_counts():
    config = load_config(REPO / "configs" / "eight_real_tasks.yaml")
    for task in config.tasks.values():
        task.max_rows.train = task.max_rows.validation = None
    data = load_tasks(config.tasks, seed=13)
    for name, expected in EXPECTED.items():
        sizes = {split: len(rows) for split, rows in data[name].splits.items()}
        sizes["train+validation"] = sizes["train"] + sizes["validation"]
        assert {k: sizes[k] for k in expected} == expected, name
    assert data["mrpc"].labels == ["not_paraphrase", "paraphrase"]
    assert sum(e.label == "paraphrase" for e in data["mrpc"].splits["test"]) == 1_147
    assert sum(e.label == "not_entailment" for e in data["rte"].splits["test"]) == 131
    entities = sum(tag.startswith("B-") for e in data["wnut17"].splits["train"] for tag in e.label)
    assert entities == 1_975 and len(data["wnut17"].labels) == 13
    stsb = data["stsb"].splits["train"]
    assert all(0.0 <= e.label <= 5.0 for e in stsb) and len(stsb[0].texts) == 2
