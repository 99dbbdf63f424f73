"""Averaging, Metropolis weights, screening, robust rules, configs and the registry.

Every rule is compared with an independent computation (``np.average``, a hand-worked
graph, per-coordinate sorting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silomesh.strategies import (
    SELF,
    Contribution,
    FedAvgConfig,
    FedAvgStrategy,
    available_strategies,
    get_strategy,
    metropolis_matrix,
    metropolis_weights,
    strategy_from_table,
    weighted_average,
)
from silomesh.strategies.robust import clip_threshold, delta_norm, trim_count


def make_state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "conv.weight": (scale * rng.standard_normal((4, 2, 3, 3))).astype(np.float32),
        "conv.bias": (scale * rng.standard_normal(4)).astype(np.float32),
        "bn.num_batches_tracked": np.array(int(rng.integers(0, 100)), dtype=np.int64),
    }


def contributions(
    states: Sequence[Mapping[str, np.ndarray]],
    ns: Sequence[int] | None = None,
    degrees: Sequence[int] | None = None,
    losses: Sequence[float] | None = None,
) -> list[Contribution]:
    out = []
    for i, s in enumerate(states):
        out.append(Contribution(
            peer_id=f"p{i}", state=s,
            n_samples=1 if ns is None else ns[i],
            degree=None if degrees is None else degrees[i],
            loss=None if losses is None else losses[i],
        ))
    return out


# --- averaging -----------------------------------------------------------------------


def test_weighted_average_matches_np_average_per_key() -> None:
    rng = np.random.default_rng(0)
    states = [make_state(rng) for _ in range(4)]
    w = np.array([0.1, 0.2, 0.3, 0.4])
    out = weighted_average(states, w)
    for key in ("conv.weight", "conv.bias"):
        ref = np.average(np.stack([s[key] for s in states]).astype(np.float64), axis=0,
                         weights=w)
        np.testing.assert_allclose(out[key], ref, rtol=1e-6, atol=1e-6)
        assert out[key].dtype == np.float32


def test_fedavg_sample_weights_match_np_average() -> None:
    rng = np.random.default_rng(1)
    own, *others = [make_state(rng) for _ in range(4)]
    ns = [30, 10, 60]
    result = FedAvgStrategy().aggregate(own, 100, contributions(others, ns))
    w = np.array([100, *ns], dtype=np.float64)
    ref = np.average(np.stack([s["conv.weight"] for s in [own, *others]]).astype(np.float64),
                     axis=0, weights=w)
    np.testing.assert_allclose(result.state["conv.weight"], ref, rtol=1e-6, atol=1e-6)
    assert result.weights[SELF] == pytest.approx(0.5)
    assert result.weights["p2"] == pytest.approx(0.3)
    assert result.dropped == {}


def test_aggregate_without_neighbours_returns_own_model_unchanged() -> None:
    own = make_state(np.random.default_rng(2))
    result = FedAvgStrategy().aggregate(own, 10, [])
    for k in own:
        assert np.array_equal(result.state[k], own[k])
    assert result.weights == {SELF: 1.0}


def test_aggregate_does_not_modify_inputs() -> None:
    rng = np.random.default_rng(3)
    own, other = make_state(rng), make_state(rng)
    own_copy = {k: v.copy() for k, v in own.items()}
    FedAvgStrategy().aggregate(own, 1, contributions([other]))
    for k in own:
        assert np.array_equal(own[k], own_copy[k])


def test_integer_buffers_keep_own_value_by_default() -> None:
    own = {"w": np.zeros(2, np.float32), "bn.num_batches_tracked": np.array(10, np.int64)}
    other = {"w": np.ones(2, np.float32), "bn.num_batches_tracked": np.array(31, np.int64)}
    out = FedAvgStrategy().aggregate(own, 1, contributions([other])).state
    assert out["bn.num_batches_tracked"] == 10
    assert out["bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_allclose(out["w"], 0.5)


def test_integer_buffers_are_rounded_average_with_round_policy() -> None:
    own = {"bn.num_batches_tracked": np.array(10, np.int64)}
    other = {"bn.num_batches_tracked": np.array(31, np.int64)}
    strategy = get_strategy("fedavg", {"int_policy": "round"})
    out = strategy.aggregate(own, 1, contributions([other])).state
    assert out["bn.num_batches_tracked"] == 20  # rint(20.5) = 20 (round half to even)
    assert out["bn.num_batches_tracked"].dtype == np.int64


# --- Metropolis ----------------------------------------------------------------------

# Hand-worked graph: edges 0-1, 1-2, 1-3, 2-3; degrees d = (1, 3, 2, 2).
# w_ij = 1 / (1 + max(d_i, d_j)):  w01 = w12 = w13 = 1/4, w23 = 1/3;
# diagonal: w00 = 3/4, w11 = 1/4, w22 = w33 = 1 - 1/4 - 1/3 = 5/12.
HAND_ADJ = np.array([[0, 1, 0, 0], [1, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]])
HAND_W = np.array([
    [3 / 4, 1 / 4, 0, 0],
    [1 / 4, 1 / 4, 1 / 4, 1 / 4],
    [0, 1 / 4, 5 / 12, 1 / 3],
    [0, 1 / 4, 1 / 3, 5 / 12],
])


def test_metropolis_matrix_matches_hand_worked_graph() -> None:
    w = metropolis_matrix(HAND_ADJ)
    np.testing.assert_allclose(w, HAND_W)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(w, w.T)


def test_metropolis_weights_of_each_peer_equal_its_matrix_row() -> None:
    deg = HAND_ADJ.sum(axis=1)
    for i in range(4):
        nbrs = np.flatnonzero(HAND_ADJ[i])
        w = metropolis_weights(int(deg[i]), [int(deg[j]) for j in nbrs])
        np.testing.assert_allclose(w, [HAND_W[i, i], *HAND_W[i, nbrs]])


def test_metropolis_missing_neighbour_leaves_its_share_with_self() -> None:
    # peer 1 (degree 3) hears only from peers 0 and 2 this round
    w = metropolis_weights(3, [1, 2])
    np.testing.assert_allclose(w, [1 / 2, 1 / 4, 1 / 4])


def test_fedavg_metropolis_weights_come_from_contribution_degrees() -> None:
    rng = np.random.default_rng(4)
    own, *others = [make_state(rng) for _ in range(4)]
    strategy = get_strategy("fedavg", {"weighting": "metropolis"})
    assert "degree" in strategy.contribution_fields
    result = strategy.aggregate(own, 1, contributions(others, degrees=[1, 2, 2]), own_degree=3)
    ref = np.average(np.stack([s["conv.bias"] for s in [own, *others]]).astype(np.float64),
                     axis=0, weights=HAND_W[1])
    np.testing.assert_allclose(result.state["conv.bias"], ref, rtol=1e-6, atol=1e-6)


def test_metropolis_drops_neighbour_without_degree() -> None:
    rng = np.random.default_rng(5)
    own, a, b = (make_state(rng) for _ in range(3))
    cs = [Contribution("a", a, degree=2), Contribution("b", b)]
    result = get_strategy("fedavg", {"weighting": "metropolis"}).aggregate(
        own, 1, cs, own_degree=2)
    assert "b" in result.dropped and "degree" in result.dropped["b"]
    assert set(result.weights) == {SELF, "a"}


# --- screening -----------------------------------------------------------------------


def test_nonfinite_contribution_is_dropped_and_reported() -> None:
    rng = np.random.default_rng(6)
    own, good, bad = (make_state(rng) for _ in range(3))
    bad["conv.bias"][1] = np.nan
    result = FedAvgStrategy().aggregate(own, 1, [Contribution("good", good),
                                                  Contribution("bad", bad)])
    assert "non-finite" in result.dropped["bad"]
    assert np.all(np.isfinite(result.state["conv.bias"]))
    ref = (own["conv.bias"].astype(np.float64) + good["conv.bias"]) / 2
    np.testing.assert_allclose(result.state["conv.bias"], ref, rtol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.pop("conv.bias"), "missing key"),
        (lambda s: s.__setitem__("conv.bias", np.zeros(5, np.float32)), "shape"),
        (lambda s: s.__setitem__("conv.bias", np.full(4, np.inf, np.float32)), "non-finite"),
    ],
)
def test_malformed_contribution_is_dropped_with_reason(
    mutate: Callable[[dict[str, np.ndarray]], object], reason: str
) -> None:
    rng = np.random.default_rng(7)
    own, other = make_state(rng), make_state(rng)
    mutate(other)
    result = FedAvgStrategy().aggregate(own, 1, [Contribution("x", other)])
    assert reason in result.dropped["x"]
    assert np.array_equal(result.state["conv.bias"], own["conv.bias"])


def test_duplicate_peer_contribution_is_dropped() -> None:
    rng = np.random.default_rng(8)
    own, a, b = (make_state(rng) for _ in range(3))
    result = FedAvgStrategy().aggregate(own, 1, [Contribution("a", a), Contribution("a", b)])
    assert "duplicate" in result.dropped["a"]
    assert result.weights["a"] == pytest.approx(0.5)


# --- robust aggregation --------------------------------------------------------------


def honest_and_poisoned(
    n_honest: int = 4, seed: int = 9
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    own = {"w": rng.standard_normal(50).astype(np.float32)}
    honest = [{"w": own["w"] + 0.1 * rng.standard_normal(50).astype(np.float32)}
              for _ in range(n_honest)]
    poisoned = {"w": np.full(50, 1e6, np.float32)}
    return own, honest, poisoned


def test_plain_average_is_wrecked_by_a_poisoned_neighbour() -> None:
    own, honest, poisoned = honest_and_poisoned()
    out = FedAvgStrategy().aggregate(own, 1, contributions([*honest, poisoned])).state
    assert np.abs(out["w"]).max() > 1e4  # why the robust rules exist


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_stay_within_honest_range(rule: str) -> None:
    own, honest, poisoned = honest_and_poisoned()
    strategy = get_strategy("fedavg", {"robust": rule})
    out = strategy.aggregate(own, 1, contributions([*honest, poisoned])).state["w"]
    stack = np.stack([own["w"], *[h["w"] for h in honest]])
    assert np.all(out >= stack.min(axis=0) - 1e-6)
    assert np.all(out <= stack.max(axis=0) + 1e-6)


def test_median_of_own_and_two_neighbours_ignores_one_poisoned() -> None:
    own, honest, poisoned = honest_and_poisoned(n_honest=1)
    out = get_strategy("fedavg", {"robust": "median"}).aggregate(
        own, 1, contributions([honest[0], poisoned])).state["w"]
    np.testing.assert_allclose(out, np.maximum(own["w"], honest[0]["w"]), rtol=1e-6)


def test_trimmed_mean_matches_sorted_slice_mean() -> None:
    rng = np.random.default_rng(10)
    states = [{"w": rng.standard_normal(20)} for _ in range(6)]
    out = get_strategy("fedavg", {"robust": "trimmed_mean", "trim": 0.2}).aggregate(
        states[0], 1, contributions(states[1:])).state["w"]
    srt = np.sort(np.stack([s["w"] for s in states]), axis=0)
    np.testing.assert_allclose(out, srt[2:4].mean(axis=0))  # ceil(0.2 * 6) = 2 each end


def test_trim_count_bites_for_small_neighbourhoods() -> None:
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 5, 6, 10)] == [0, 0, 1, 1, 2, 2]
    assert trim_count(4, 0.0) == 0


def test_absolute_clipping_bounds_the_step_norm() -> None:
    own, honest, poisoned = honest_and_poisoned()
    result = get_strategy("fedavg", {"robust": "clip", "clip_norm": 1.0,
                                     "clip_multiplier": 0}).aggregate(
        own, 1, contributions([*honest, poisoned]))
    step = delta_norm(own, result.state, ["w"])
    assert step <= 1.0 + 1e-6
    assert "p4" in result.clip_scale and result.clip_scale["p4"] < 1e-5


def test_relative_clipping_limits_poisoned_delta_to_multiple_of_median() -> None:
    own, honest, poisoned = honest_and_poisoned(n_honest=2)
    norms = [delta_norm(own, h, ["w"]) for h in honest]
    result = get_strategy("fedavg", {"robust": "clip", "clip_multiplier": 2.0}).aggregate(
        own, 1, contributions([*honest, poisoned]))
    bound = 2.0 * sorted([*norms, 1e9])[1]
    assert result.info["clip_threshold"] == pytest.approx(bound, rel=1e-6)
    assert delta_norm(own, result.state, ["w"]) <= bound + 1e-5


def test_clip_threshold_uses_lower_median_and_smaller_bound() -> None:
    assert clip_threshold([1.0, 100.0], None, 2.0) == 2.0
    assert clip_threshold([1.0, 2.0, 100.0], 1.5, 2.0) == 1.5
    assert math.isinf(clip_threshold([], None, 2.0))


# --- hypothesis properties -----------------------------------------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=6),
    raw_w=st.lists(st.floats(0.01, 10.0), min_size=6, max_size=6),
)
def test_weighted_average_is_a_convex_combination(values: list[list[float]], raw_w: list[float]) -> None:
    states = [{"w": np.array(v, np.float64)} for v in values]
    w = np.array(raw_w[: len(states)])
    out = weighted_average(states, w)["w"]
    stack = np.stack([s["w"] for s in states])
    tol = 1e-9 * (1 + np.abs(stack).max())
    assert np.all(out >= stack.min(axis=0) - tol)
    assert np.all(out <= stack.max(axis=0) + tol)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    perm_seed=st.integers(0, 2**16),
    rule=st.sampled_from(["none", "median", "trimmed_mean", "clip"]),
)
def test_aggregation_is_invariant_to_neighbour_order(seed: int, perm_seed: int, rule: str) -> None:
    rng = np.random.default_rng(seed)
    own = {"w": rng.standard_normal(8)}
    others = [{"w": rng.standard_normal(8) * rng.uniform(0.1, 5)} for _ in range(4)]
    cs = contributions(others, ns=[int(n) for n in rng.integers(1, 50, 4)])
    order = np.random.default_rng(perm_seed).permutation(4)
    strategy = get_strategy("fedavg", {"robust": rule})
    a = strategy.aggregate(own, 7, cs).state["w"]
    b = strategy.aggregate(own, 7, [cs[i] for i in order]).state["w"]
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# --- configs and registry ------------------------------------------------------------


def test_registry_lists_the_five_strategies() -> None:
    assert available_strategies() == ["cyclic", "fedavg", "fedefm", "fedmix", "segviz"]


def test_unknown_strategy_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        get_strategy("fedprox")


def test_unknown_parameter_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="unknown parameter 'betta'"):
        get_strategy("fedefm", {"betta": 0.3})


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("fedefm", {"beta": 1.5}, "beta"),
        ("fedefm", {"beta": "high"}, "beta"),
        ("fedefm", {"emd_method": "greedy"}, "emd_method"),
        ("fedavg", {"weighting": "random"}, "weighting"),
        ("fedavg", {"robust": "krum"}, "robust"),
        ("fedavg", {"trim": 0.5}, "trim"),
        ("fedmix", {"tau": -0.1}, "tau"),
        ("segviz", {"head_prefixes": "head."}, "head_prefixes"),
        ("fedefm", {"local_steps": 2.5}, "local_steps"),
        ("fedavg", {"robust": "clip", "clip_multiplier": 0}, "clip_"),
    ],
)
def test_bad_parameter_value_is_named_in_the_error(name: str, params: dict[str, object], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        get_strategy(name, params)


def test_toml_values_are_coerced_to_field_types() -> None:
    s = get_strategy("segviz", {"head_prefixes": ["head."], "finetune_lr": 1, "clip_norm": 3})
    assert s.config.head_prefixes == ("head.",)
    assert isinstance(s.config.finetune_lr, float)
    assert s.config.clip_norm == 3.0 and isinstance(s.config.clip_norm, float)


def test_strategy_from_table_uses_its_name_key() -> None:
    s = strategy_from_table({"name": "fedavg", "weighting": "uniform"})
    assert isinstance(s, FedAvgStrategy)
    assert s.config == FedAvgConfig(weighting="uniform")
    assert s.config.to_dict()["weighting"] == "uniform"


def test_strategy_rejects_config_of_another_strategy() -> None:
    with pytest.raises(TypeError):
        FedAvgStrategy(get_strategy("fedmix").config)


def test_only_strategies_that_name_their_partners_need_them_trusted() -> None:
    ring = ["a", "b", "c", "d"]
    assert get_strategy("fedavg").trust_problem("a", set()) is None  # any trusted neighbours will do
    assert get_strategy("fedefm").trust_problem("a", set()) is None
    cyclic = get_strategy("cyclic", {"order": ring})
    assert cyclic.trust_problem("a", {"b", "d"}) is None
    assert cyclic.trust_problem("a", {"b", "c"}) == (
        "params.order: d, next to this peer in the ring, is not a trusted peer")
    tree = get_strategy("fedavg", {"reduce": "tree", "order": ring})  # a: root, b and c its children, d under b
    assert tree.trust_problem("b", {"a", "d"}) is None
    assert tree.trust_problem("a", {"b", "d"}) == (
        "params.order: c, next to this peer in the tree, is not a trusted peer")
