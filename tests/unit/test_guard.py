import pytest
import torch

from multitune.analysis.guard import NegativeTransferGuard

NAMES = ["good", "noise", "other"]
# row "noise" hurts the others; the others help each other
AFFINITY = torch.tensor([[0.1, 0.0, 0.05], [-0.2, 0.01, -0.1], [0.04, 0.0, 0.1]])


def test_a_harmful_task_that_does_not_improve_is_downweighted_after_patience():
    guard = NegativeTransferGuard(NAMES, patience=2, factor=0.5)
    assert guard.observe(1, {"good": 0.6, "noise": 0.50, "other": 0.5}, AFFINITY) == []  # first: no gain yet
    assert guard.observe(2, {"good": 0.7, "noise": 0.49, "other": 0.6}, AFFINITY) == []  # strike 1
    (action,) = guard.observe(3, {"good": 0.8, "noise": 0.50, "other": 0.7}, AFFINITY)  # strike 2
    assert (action.task, action.action, action.scale) == ("noise", "downweight", 0.5)
    assert "lookahead affinity -1.500e-01, mean over 3 validations" in action.why
    assert guard.scale == {"good": 1.0, "noise": 0.5, "other": 1.0}


def test_drop_removes_the_task_and_an_improving_task_is_spared():
    guard = NegativeTransferGuard(NAMES, action="drop", patience=1)
    guard.observe(1, {"good": 0.6, "noise": 0.5, "other": 0.5}, AFFINITY)
    actions = guard.observe(2, {"good": 0.7, "noise": 0.6, "other": 0.6}, AFFINITY)  # noise improved by 0.1
    assert actions == []
    (action,) = guard.observe(3, {"good": 0.8, "noise": 0.55, "other": 0.7}, AFFINITY)
    assert action.task == "noise" and not guard.active("noise")
    assert guard.observe(4, {"good": 0.8, "noise": 0.5, "other": 0.7}, AFFINITY) == []  # dropped: not judged


def test_state_round_trip_and_bad_action():
    guard = NegativeTransferGuard(NAMES, patience=2)
    guard.observe(1, {"good": 0.6, "noise": 0.5, "other": 0.5}, AFFINITY)
    guard.observe(2, {"good": 0.6, "noise": 0.5, "other": 0.5}, AFFINITY)
    restored = NegativeTransferGuard(NAMES, patience=2)
    restored.load_state_dict(guard.state_dict())
    scores = {"good": 0.6, "noise": 0.5, "other": 0.5}
    assert [a.task for a in guard.observe(3, scores, AFFINITY)] == [
        a.task for a in restored.observe(3, scores, AFFINITY)
    ]
    with pytest.raises(ValueError, match="action"):
        NegativeTransferGuard(NAMES, action="delete")


def test_with_a_baseline_a_converged_task_at_its_baseline_is_spared():
    baselines = {"good": 0.6, "noise": 0.8, "other": 0.5}
    guard = NegativeTransferGuard(NAMES, patience=1, baselines=baselines)
    converged = {"good": 0.7, "noise": 0.3, "other": 0.55}
    harmful = -AFFINITY.abs() - 0.01  # every task's steps hurt the others; only "noise" is below its baseline
    harmful.fill_diagonal_(0.1)  # (each task's own step helps itself: none is learning noise)
    (first,) = guard.observe(1, converged, harmful)  # with a baseline the first validation can already judge
    (second,) = guard.observe(2, converged, harmful)
    assert first.task == second.task == "noise" and (first.scale, second.scale) == (0.5, 0.25)
    assert "below its single-task baseline 0.8000" in second.why


def test_a_baseline_trajectory_is_compared_at_the_same_rows_seen():
    from multitune.analysis.guard import interpolate

    assert interpolate([(100, 0.2), (300, 0.6)], 200) == pytest.approx(0.4)
    assert interpolate([(100, 0.2), (300, 0.6)], 50) == 0.2 and interpolate([(100, 0.2), (300, 0.6)], 900) == 0.6
    # "noise" ends far above where the multi-task run is, but at 200 rows the baseline was only at 0.4:
    # a task still learning on schedule is not flagged against the baseline's final score
    trajectories = {"noise": [(100, 0.2), (300, 0.6), (1000, 0.9)]}
    guard = NegativeTransferGuard(NAMES, patience=1, baselines={"noise": 0.9}, trajectories=trajectories)
    harmful = (-AFFINITY.abs() - 0.01).fill_diagonal_(0.1)
    scores = {"good": 0.7, "noise": 0.45, "other": 0.55}
    rows = {"good": 200, "noise": 200, "other": 200}
    assert [a.task for a in guard.observe(1, scores, harmful, rows)] != ["noise"]
    late = guard.observe(2, {**scores, "noise": 0.46}, harmful, {**rows, "noise": 1000})  # now behind schedule
    assert "noise" in [a.task for a in late]
    assert "single-task baseline 0.9000 (at 1000 rows seen)" in next(a.why for a in late if a.task == "noise")


def test_a_task_whose_own_steps_do_not_generalize_is_caught_even_above_its_baseline():
    # "noise" gains and sits above its (chance-level) baseline, so it never lags; but its own step raises its
    # own held-out loss and raises "good"'s: the affinity on held-out rows gives it away
    affinity = torch.tensor([[0.1, 0.0, 0.05], [-0.02, -0.001, 0.03], [0.04, 0.0, 0.1]])
    guard = NegativeTransferGuard(NAMES, patience=2, baselines={"good": 0.5, "noise": 0.2, "other": 0.4})
    assert guard.observe(1, {"good": 0.6, "noise": 0.25, "other": 0.5}, affinity) == []
    (action,) = guard.observe(2, {"good": 0.7, "noise": 0.30, "other": 0.6}, affinity)
    assert action.task == "noise" and action.scale == 0.5
    assert (
        "own held-out loss (lookahead affinity -1.000e-03, mean over 2 validations)" in action.why
        and "'good'" in action.why
    )
    # the same task is spared when it helps every other task, or when its own step helps itself
    spared = affinity.clone()
    spared[1, 0] = 0.01
    assert NegativeTransferGuard(NAMES, patience=1).observe(1, {"good": 0.6, "noise": 0.3, "other": 0.5}, spared) == []
    learning = affinity.clone()
    learning[1, 1] = 0.02
    assert (
        NegativeTransferGuard(NAMES, patience=1).observe(1, {"good": 0.6, "noise": 0.3, "other": 0.5}, learning) == []
    )


def test_the_guard_judges_the_running_mean_of_the_affinity_not_one_noisy_validation():
    scores = {"good": 0.6, "noise": 0.3, "other": 0.5}
    steady = AFFINITY.clone()
    steady[1, 1] = -0.001  # "noise" never helps its own held-out loss and always raises "good"'s
    guard = NegativeTransferGuard(NAMES, patience=1, baselines={"good": 0.5, "noise": 0.2, "other": 0.4})
    assert [a.task for a in guard.observe(1, scores, steady)] == ["noise"]
    # one validation where "good"'s own step happened to raise its held-out loss and "other"'s: on that
    # validation alone it looks like noise, but over the run its own-affinity is clearly positive
    unlucky = steady.clone()
    unlucky[0, 0], unlucky[0, 2] = -0.05, -0.01
    assert "good" not in [a.task for a in guard.observe(2, scores, unlucky)]
    assert guard.validations == 2
    assert torch.allclose(guard.affinity_sum, (steady + unlucky).double())
    alone = NegativeTransferGuard(NAMES, patience=1, baselines={"good": 0.5, "noise": 0.2, "other": 0.4})
    assert "good" in [a.task for a in alone.observe(1, scores, unlucky)]  # that validation alone would act


def test_validations_before_the_start_step_are_not_judged():
    scores = {"good": 0.6, "noise": 0.3, "other": 0.5}
    early = AFFINITY.clone()
    early[0, 0], early[0, 2] = -0.05, -0.01  # "good" looks like noise while the run is settling
    guard = NegativeTransferGuard(
        NAMES, patience=1, baselines={"good": 0.5, "noise": 0.2, "other": 0.4}, start_step=100
    )
    assert guard.observe(50, scores, early) == [] and guard.observe(100, scores, early) == []
    assert guard.validations == 0 and guard.affinity_sum is None
    assert "good" not in [a.task for a in guard.observe(150, scores, AFFINITY)]
    eager = NegativeTransferGuard(NAMES, patience=1, baselines={"good": 0.5, "noise": 0.2, "other": 0.4})
    assert "good" in [a.task for a in eager.observe(50, scores, early)]


def test_compare_records_trajectories_the_guard_reads(tmp_path):
    import json

    from multitune.catalogue import validate_config
    from multitune.recipe.components import guard_baselines

    comparison = tmp_path / "comparison.json"
    entry = {"single": 0.5, "higher_is_better": False, "single_trajectory": [[32, 0.9], [64, 0.5]]}
    comparison.write_text(json.dumps({"tasks": {"a": entry}}), encoding="utf-8")
    config = validate_config(
        {
            "guard": {"enabled": True, "baselines_from": str(comparison)},
            "tasks": {"a": {"type": "regression", "source": {"format": "jsonl", "train": "x"}}},
        }
    )
    baselines, trajectories = guard_baselines(config.guard, list(config.tasks))
    assert baselines == {"a": -0.5} and trajectories == {"a": [(32, -0.9), (64, -0.5)]}
