"""FindBestWorker's cost function and choice (indexer.scheduling), without a server."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer.errors import InvalidQueryError
from indexer.scheduling import (
    Candidate,
    choose,
    choose_worker,
    rank_costs,
    softmax_probabilities,
    validate_knobs,
)


class TestCost:
    """cost = overlap_weight * (query_blocks - matched_blocks) + active_blocks."""

    def test_cost_of_each_candidate(self) -> None:
        """Prefill blocks and cost follow the documented formula."""
        ranked = rank_costs([Candidate("a", 0, 6, active_blocks=3), Candidate("b", 1, 0)],
                            query_blocks=10, overlap_weight=2.0)
        by_worker = {c.worker_id: c for c in ranked}
        assert (by_worker["a"].prefill_blocks, by_worker["a"].cost) == (4, 2.0 * 4 + 3)
        assert (by_worker["b"].prefill_blocks, by_worker["b"].cost) == (10, 20.0)

    def test_matched_beyond_query_counts_no_negative_prefill(self) -> None:
        """A candidate never has negative prefill blocks."""
        [cost] = rank_costs([Candidate("a", 0, 12)], query_blocks=10)
        assert cost.prefill_blocks == 0
        assert cost.cost == 0.0

    def test_overlap_weight_zero_is_pure_load_balancing(self) -> None:
        """With overlap_weight 0 only active blocks count."""
        chosen, _ = choose_worker([Candidate("hit", 0, 10, active_blocks=5),
                                   Candidate("idle", 0, 0)], 10, overlap_weight=0.0)
        assert chosen.worker_id == "idle"


class TestDeterministicChoice:
    """Temperature 0: lowest cost, then the documented tie-breaks."""

    def test_cache_hit_wins_when_load_is_equal(self) -> None:
        """The candidate holding most of the prompt has the lowest cost."""
        chosen, ranked = choose_worker([Candidate("a", 0, 2), Candidate("b", 0, 8)], 10)
        assert chosen.worker_id == "b"
        assert [c.worker_id for c in ranked] == ["b", "a"]

    def test_cache_hit_outweighed_by_load(self) -> None:
        """A full hit loses to a cold worker when its active blocks exceed the prompt."""
        chosen, _ = choose_worker([Candidate("hot", 0, 10, active_blocks=11),
                                   Candidate("cold", 0, 0, active_blocks=0)], 10,
                                  overlap_weight=1.0)
        assert chosen.worker_id == "cold"

    def test_tie_goes_to_more_matched_blocks(self) -> None:
        """Equal cost: the candidate with more matched blocks wins."""
        chosen, _ = choose_worker([Candidate("less", 0, 2, active_blocks=0),
                                   Candidate("more", 0, 6, active_blocks=4)], 10)
        assert chosen.worker_id == "more"

    def test_tie_then_fewer_waiting_requests(self) -> None:
        """Equal cost and overlap: fewer waiting requests wins."""
        chosen, _ = choose_worker([Candidate("a", 0, 3, waiting_requests=2),
                                   Candidate("b", 0, 3, waiting_requests=1)], 10)
        assert chosen.worker_id == "b"

    def test_tie_then_worker_id_and_rank(self) -> None:
        """Otherwise the smallest (worker_id, dp_rank) wins, whatever the input order."""
        candidates = [Candidate("b", 0, 3), Candidate("a", 1, 3), Candidate("a", 0, 3)]
        for order in (candidates, candidates[::-1]):
            chosen, ranked = choose_worker(order, 10)
            assert (chosen.worker_id, chosen.dp_rank) == ("a", 0)
            assert [(c.worker_id, c.dp_rank) for c in ranked] == [("a", 0), ("a", 1), ("b", 0)]

    @given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3), st.integers(0, 20),
                              st.integers(0, 30)),
                    min_size=1, max_size=12, unique_by=lambda t: t[:2]),
           st.integers(0, 20), st.floats(0, 4))
    def test_winner_has_the_minimum_cost(
        self, rows: list[tuple[str, int, int, int]], query_blocks: int, weight: float
    ) -> None:
        """At temperature 0 no candidate is cheaper than the chosen one."""
        candidates = [Candidate(w, r, m, active_blocks=a) for w, r, m, a in rows]
        chosen, ranked = choose_worker(candidates, query_blocks, overlap_weight=weight)
        assert chosen == ranked[0]
        assert chosen.cost == min(c.cost for c in ranked)
        assert len(ranked) == len(candidates)


class TestSampling:
    """Temperature > 0: softmax over min-max normalised costs."""

    def test_probabilities_are_scale_free(self) -> None:
        """Scaling every cost by 1000 leaves the probabilities unchanged."""
        small = softmax_probabilities([1.0, 2.0, 3.0], 0.5)
        large = softmax_probabilities([1000.0, 2000.0, 3000.0], 0.5)
        assert small == pytest.approx(large)
        assert sum(small) == pytest.approx(1.0)

    def test_temperature_one_gives_odds_of_e(self) -> None:
        """At temperature 1 the cheapest is e times as likely as the most expensive."""
        p = softmax_probabilities([0.0, 10.0], 1.0)
        assert p[0] / p[1] == pytest.approx(math.e)

    def test_equal_costs_are_uniform(self) -> None:
        """All costs equal: every candidate is equally likely."""
        assert softmax_probabilities([5.0, 5.0, 5.0, 5.0], 2.0) == [0.25] * 4

    def test_seeded_sampling_is_reproducible(self) -> None:
        """The same seed gives the same sequence of choices."""
        ranked = rank_costs([Candidate(w, 0, m) for w, m in (("a", 0), ("b", 5), ("c", 9))], 10)
        rng1, rng2 = random.Random(42), random.Random(42)
        seq1 = [choose(ranked, 1.0, rng1).worker_id for _ in range(50)]
        seq2 = [choose(ranked, 1.0, rng2).worker_id for _ in range(50)]
        assert seq1 == seq2
        assert len(set(seq1)) > 1  # it does sample, not just take the cheapest

    def test_sampling_follows_the_probabilities(self) -> None:
        """Observed frequencies match softmax_probabilities within sampling noise."""
        ranked = rank_costs([Candidate(w, 0, m) for w, m in (("a", 0), ("b", 5), ("c", 10))], 10)
        rng = random.Random(1)
        n = 20_000
        counts = Counter(choose(ranked, 0.5, rng).worker_id for _ in range(n))
        expected = softmax_probabilities([c.cost for c in ranked], 0.5)
        for cost, p in zip(ranked, expected, strict=True):
            assert counts[cost.worker_id] / n == pytest.approx(p, abs=0.015)

    def test_low_temperature_approaches_argmin(self) -> None:
        """A tiny temperature picks the cheapest almost always."""
        ranked = rank_costs([Candidate("a", 0, 0), Candidate("b", 0, 10)], 10)
        rng = random.Random(3)
        assert all(choose(ranked, 0.01, rng).worker_id == "b" for _ in range(200))


class TestKnobs:
    """overlap_weight and temperature are validated."""

    @pytest.mark.parametrize(("weight", "temperature", "name"), [
        (-1.0, 0.0, "overlap_weight"), (math.nan, 0.0, "overlap_weight"),
        (math.inf, 0.0, "overlap_weight"), (1.0, -0.5, "temperature"),
        (1.0, math.nan, "temperature"),
    ])
    def test_bad_knob_is_refused_by_name(self, weight: float, temperature: float,
                                         name: str) -> None:
        """A negative, NaN or infinite knob raises InvalidQueryError naming it."""
        with pytest.raises(InvalidQueryError, match=name):
            validate_knobs(weight, temperature)

    def test_no_candidates_is_an_error(self) -> None:
        """Choosing among nothing raises instead of inventing a worker."""
        with pytest.raises(ValueError, match="no candidates"):
            choose([], 0.0)
