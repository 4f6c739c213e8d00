from multitune.data.streams import TaskStream


def test_each_epoch_is_a_fresh_permutation_of_all_rows():
    stream = TaskStream(list(range(10)), seed="s")
    first, second = stream.take(10), stream.take(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert stream.state_dict() == {"epoch": 1, "offset": 10}


def test_resume_from_state_continues_the_same_sequence():
    stream = TaskStream(list(range(7)), seed="s")
    stream.take(12)
    state = stream.state_dict()
    expected = stream.take(20)
    resumed = TaskStream(list(range(7)), seed="s")
    resumed.load_state_dict(state)
    assert resumed.take(20) == expected


def _padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_epochs_cover_every_row_with_less_padding_and_resume_exactly():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    rows = list(range(1000))
    grouped = TaskStream(rows, seed="s", group_size=16, lengths=lengths)
    plain = TaskStream(rows, seed="s")
    first = grouped.take(1000)
    assert sorted(first) == rows and grouped.take(1000) != first  # a fresh grouped permutation per epoch
    batches = [first[i : i + 16] for i in range(0, 1000, 16)]
    plain_batches = [plain.take(16) for _ in range(len(batches))]
    assert _padding(batches, lengths) < 0.2 * _padding(plain_batches, lengths)
    assert len({tuple(sorted(b)) for b in batches[:5]}) == 5
    sizes = [max(lengths[i] for i in b) for b in batches]
    assert sizes != sorted(sizes, reverse=True)  # the groups come in random order, not longest first

    state = grouped.state_dict()
    expected = grouped.take(300)
    resumed = TaskStream(rows, seed="s", group_size=16, lengths=lengths)
    resumed.load_state_dict(state)
    assert resumed.take(300) == expected


def test_length_grouping_needs_a_length_per_row():
    import pytest

    with pytest.raises(ValueError, match="one length per row"):
        TaskStream([1, 2, 3], seed="s", group_size=2, lengths=[1, 2])
