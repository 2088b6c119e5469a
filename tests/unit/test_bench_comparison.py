"""The bench harness's arithmetic: a comparison reports the median of paired ratios."""

from bench.harness import Comparison


def test_a_comparison_reports_the_median_of_paired_ratios():
    result = Comparison("x", "s", target=1.03, ours=[1.0, 2.2, 3.0], baseline=[1.0, 2.0, 2.0])
    assert result.ratios == [1.0, 1.1, 1.5] and result.median == 1.1 and not result.met
    assert result.best_ratio == 1.0
    throughput = Comparison("y", "samples/s", target=1.0, higher_is_better=True, ours=[10.0], baseline=[8.0])
    assert throughput.met and "met" in throughput.summary()
