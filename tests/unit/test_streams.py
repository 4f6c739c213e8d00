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
