import torch

from multitune.analysis.affinity import best_grouping, cosine_matrix, lookahead_affinity, partitions


def test_partitions_are_complete_and_distinct():
    found = list(partitions([0, 1, 2, 3], 2))
    assert len(found) == 7  # Stirling number S(4, 2)
    assert len({tuple(tuple(g) for g in p) for p in found}) == 7
    assert all(sorted(i for g in p for i in g) == [0, 1, 2, 3] for p in found)
    assert len(list(partitions(list(range(6)), 3))) == 90  # S(6, 3)


def test_grouping_puts_mutually_helpful_tasks_together():
    affinity = torch.tensor(
        [[0.0, 0.5, -0.2, -0.3], [0.4, 0.0, -0.1, -0.2], [-0.2, -0.1, 0.0, 0.6], [-0.4, -0.2, 0.5, 0.0]]
    )
    groups, score = best_grouping(["a", "b", "c", "d"], affinity, k=2)
    assert sorted(groups) == [["a", "b"], ["c", "d"]] and score > 0


def test_cosines_of_a_gramian():
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    cos = cosine_matrix(g @ g.T)
    assert torch.allclose(
        cos, torch.tensor([[1, 2**-0.5, -1], [2**-0.5, 1, -(2**-0.5)], [-1, -(2**-0.5), 1]]), atol=1e-6
    )


def test_lookahead_affinity_on_two_quadratics():
    theta = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    targets = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # task 0 pulls x to 0, task 1 pulls x to 2

    def losses():
        return ((theta - targets) ** 2).sum(1) + 1.0

    grads = torch.stack([torch.autograd.grad(losses()[i], theta)[0] for i in range(2)])
    z = lookahead_affinity([theta], grads, losses, lr=0.1)
    assert z[0, 0] > 0 and z[1, 1] > 0  # each task's own step helps it
    assert z[0, 1] < 0 and z[1, 0] < 0  # and hurts the other
    assert torch.equal(theta.detach(), torch.tensor([1.0, 1.0]))  # parameters restored


def test_a_task_whose_own_steps_do_not_lower_its_held_out_loss_is_flagged():
    from multitune.analysis.affinity import AffinityTracker

    tracker = AffinityTracker(["a", "noise", "b"])
    assert tracker.summary(2)["no_self_transfer"] == []  # nothing measured: nothing flagged
    cosine = torch.eye(3)
    tracker.add(1, cosine, torch.tensor([[0.2, 0.0, 0.1], [-0.01, 0.01, 0.0], [0.1, 0.0, 0.3]]))
    tracker.add(2, cosine, torch.tensor([[0.2, 0.0, 0.1], [-0.01, -0.03, 0.0], [0.1, 0.0, 0.3]]))
    assert tracker.summary(2)["no_self_transfer"] == ["noise"]  # mean own affinity -0.01
