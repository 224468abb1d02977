"""Vector clocks: the ordering rules in isolation."""

from streamkit._backends.fake._clocks import Clocks, EventState, merge, ordered_before


def ordered(clocks, stream_idx, seq, stream):
    """Whether kernel ``seq`` of stream ``stream_idx`` happens before what ``stream`` issues next."""
    return ordered_before(stream_idx, seq, clocks.effective(stream))


def test_merge_grows_and_takes_max():
    a = [1, 5]
    merge(a, [3, 2, 7])
    assert a == [3, 5, 7]


def test_issue_counts_per_stream():
    c = Clocks()
    s0 = c.new_stream(0, ())
    s1 = c.new_stream(0, ())
    assert [c.issue(s0), c.issue(s0), c.issue(s1)] == [1, 2, 1]
    assert not ordered_before(0, 2, s1.clock)


def test_event_wait_orders_only_captured_work():
    c = Clocks()
    s0, s1 = c.new_stream(0, ()), c.new_stream(0, ())
    c.issue(s0)
    e = EventState(False)
    c.record(e, s0, 0.0)
    c.issue(s0)  # after the record: not captured
    c.wait(s1, e)
    assert ordered_before(0, 1, s1.clock)
    assert not ordered_before(0, 2, s1.clock)


def test_rerecord_does_not_change_earlier_waits():
    c = Clocks()
    s0, s1 = c.new_stream(0, ()), c.new_stream(0, ())
    e = EventState(False)
    c.issue(s0)
    c.record(e, s0, 0.0)
    c.wait(s1, e)
    c.issue(s0)
    c.record(e, s0, 0.0)
    assert not ordered_before(0, 2, s1.clock)


def test_host_sync_orders_later_issues_and_new_streams():
    c = Clocks()
    s0, s1 = c.new_stream(0, ()), c.new_stream(0, ())
    c.issue(s0)
    assert not ordered(c, 0, 1, s1)
    c.host_waits_for(s0.clock)
    c.issue(s1)  # issued after the host returned from the sync
    assert ordered(c, 0, 1, s1)
    assert not ordered_before(0, 1, s1.clock)  # through the host clock, not a wait
    s2 = c.new_stream(0, ())
    assert ordered(c, 0, 1, s2)
    c.issue(s0)
    assert not ordered(c, 0, 2, s2)


def test_an_event_recorded_after_a_host_sync_carries_what_the_host_saw():
    c = Clocks()
    s0, s1, s2 = (c.new_stream(0, ()) for _ in range(3))
    c.issue(s0)
    c.host_waits_for(s0.clock)
    e = EventState(False)
    c.record(e, s1, 0.0)  # s1 never waited for s0, but the host did before recording
    c.wait(s2, e)
    assert ordered_before(0, 1, e.clock)
    assert ordered(c, 0, 1, s2)


def test_device_sync_covers_every_stream():
    c = Clocks()
    streams = [c.new_stream(0, ()) for _ in range(3)]
    for s in streams:
        c.issue(s)
    c.host_waits_for_all()
    assert all(ordered_before(s.idx, 1, c.host) for s in streams)


def test_transitivity_through_a_third_stream():
    c = Clocks()
    a, b, d = (c.new_stream(0, ()) for _ in range(3))
    c.issue(a)
    e1 = EventState(False)
    c.record(e1, a, 0.0)
    c.wait(b, e1)
    e2 = EventState(False)
    c.record(e2, b, 0.0)
    c.wait(d, e2)
    assert ordered_before(a.idx, 1, d.clock)
