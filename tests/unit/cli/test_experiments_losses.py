"""``liftstream experiments list``'s ingest-loss lines (``loss_lines``): quiet
at zero, a lost kind marked (red on a terminal) with its partitions' counts."""

from streams.cli.experiments import loss_lines


def test_nothing_lost_is_one_quiet_line():
    none = {"retention_lost": {}, "unrouted_lost": {"0": 0}}
    assert loss_lines("ev", none, color=True) == ["ingest losses of ev: none"]


def test_a_loss_is_marked_and_coloured_only_on_a_terminal():
    lost = {"retention_lost": {"1": 5, "0": 0}, "unrouted_lost": {}}
    plain = loss_lines("ev", lost)
    assert plain[1] == ("! retention_lost: partition 1: 5 (events the topic's retention "
                        "deleted before ingest applied them)")
    assert plain[2].startswith("  unrouted_lost: none (")
    coloured = loss_lines("ev", lost, color=True)
    assert coloured[1] == f"\x1b[1;31m{plain[1]}\x1b[0m" and coloured[2] == plain[2]
