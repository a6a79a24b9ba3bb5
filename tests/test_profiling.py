"""`workbench.profiling`: stages nest, list in the order they start, and see the memory they
hold; outside `recording()` a stage records nothing."""

import torch

from workbench import profiling


def test_stages_nest_in_start_order_and_see_what_they_allocate():
    kept = []
    with profiling.recording() as stages:
        with profiling.stage("run"):
            with profiling.stage("a"), profiling.stage("a.1"):
                pass
            with profiling.stage("b"):
                kept.append(torch.ones(50_000_000))  # 200 MB, touched, alive after the stage
                with profiling.stage("b.1"):
                    pass
        with profiling.stage("store"):
            pass
    assert [(s.name, s.depth) for s in stages] == [
        ("a.1", 2), ("a", 1), ("b.1", 2), ("b", 1), ("run", 0), ("store", 0)
    ]  # as they ended  # fmt: skip
    ordered = [line.split()[0] for line in profiling.table(stages).splitlines()[1:]]
    assert ordered == ["run", "a", "a.1", "b", "b.1", "store"]
    b = next(s for s in stages if s.name == "b")
    assert b.rss_after - b.rss_before >= 150e6
    assert b.rss_peak >= b.rss_after
    assert all(s.seconds >= 0 for s in stages)


def test_a_stage_outside_recording_records_nothing():
    with profiling.recording() as stages:
        pass
    with profiling.stage("alone"):
        pass
    assert stages == []
