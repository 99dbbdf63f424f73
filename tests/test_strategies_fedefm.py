"""FedEFM: EMD against POT and a hand-worked case, distillation on a toy SplitModel."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from silomesh.models.task import SplitModel
from silomesh.strategies import (
    KIND_TRAIN_REQUEST,
    KIND_TRAIN_RESULT,
    SELF,
    Contribution,
    FedEFMConfig,
    distill,
    distillation_term,
    feature_map_emd,
    get_strategy,
    global_model,
    node_emd,
    similarity_weights,
)
from silomesh.strategies.emd import cosine_cost, node_weights
from silomesh.strategies.fedefm import class_probabilities, expert_weights
from silomesh.strategies.training import Batch


class TinySeg(SplitModel):
    """A two-conv body and a 1x1-conv head: logits (B, 3, H, W), features (B, 8, H, W)."""

    head_prefixes = ("head.",)

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Conv2d(width, classes, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)  # (B, C, H, W)
        return self.head(f), f


def seg_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"]), batch["mask"])


def make_batches(seed: int, n: int = 4, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.rand(4, 1, size, size, generator=g)
        out.append({"image": img, "mask": (img[:, 0] * 3).long().clamp(max=2)})
    return out


def mean_kl(student: nn.Module, expert: nn.Module, batches: Iterable[Batch]) -> float:
    student.eval()
    expert.eval()
    with torch.no_grad():
        return float(np.mean([
            distillation_term(student(b["image"]), expert(b["image"]), 1.0).item()
            for b in batches
        ]))


# --- EMD -----------------------------------------------------------------------------


def reference_emd(a: np.ndarray, b: np.ndarray) -> float:
    """DeepEMD EMD written out independently with loops, solved by ot.emd2."""
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    wa = np.array([max(0.0, float(x @ mean_b)) for x in a])
    wb = np.array([max(0.0, float(y @ mean_a)) for y in b])
    wa, wb = wa / wa.sum(), wb / wb.sum()
    cost = np.array([[1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for y in b]
                     for x in a])
    return float(ot.emd2(wa, wb, cost))


def test_node_emd_matches_ot_emd2_on_independently_built_problem() -> None:
    rng = np.random.default_rng(0)
    for n, m in [(5, 7), (16, 16), (3, 9)]:
        a = np.abs(rng.standard_normal((n, 4)))
        b = np.abs(rng.standard_normal((m, 4)))
        assert node_emd(a, b) == pytest.approx(reference_emd(a, b), abs=1e-10)


def test_node_emd_hand_worked_two_points_each() -> None:
    # A = {(2,0), (1,1)}, B = {(1,0), (0,1)}.
    # mean(B) = (.5,.5): w_A = (1, 1)/2;  mean(A) = (1.5,.5): w_B = (1.5, .5)/2 = (.75,.25)
    # cost: c(a1,b1)=0, c(a1,b2)=1, c(a2,b1)=c(a2,b2)=1-1/sqrt2
    # optimal: a1 -> b1 (0.5 at 0), a2 -> b1 (0.25) and b2 (0.25) at 1-1/sqrt2
    a = np.array([[2.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    wa, wb = node_weights(a, b)
    np.testing.assert_allclose(wa, [0.5, 0.5])
    np.testing.assert_allclose(wb, [0.75, 0.25])
    c = 1 - 1 / math.sqrt(2)
    np.testing.assert_allclose(cosine_cost(a, b), [[0, 1], [c, c]], atol=1e-12)
    assert node_emd(a, b) == pytest.approx(0.5 * c, abs=1e-12)


def test_sinkhorn_emd_is_close_to_exact() -> None:
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_normal((9, 4)))
    b = np.abs(rng.standard_normal((9, 4)))
    exact = node_emd(a, b, "exact")
    approx = node_emd(a, b, "sinkhorn", reg=0.01)
    assert approx == pytest.approx(exact, abs=0.02)


def test_feature_map_emd_is_zero_for_identical_maps_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(2)
    fa = torch.rand(2, 4, 6, 6, generator=g)
    fb = torch.rand(2, 4, 6, 6, generator=g)
    np.testing.assert_allclose(feature_map_emd(fa, fa), 0.0, atol=1e-9)
    assert np.all(feature_map_emd(fa, fb) > 1e-3)


def test_similarity_weights_hand_values() -> None:
    w = similarity_weights([0.0, 0.1], "softmax", temperature=0.1)
    np.testing.assert_allclose(w, [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])
    np.testing.assert_allclose(similarity_weights([0.2, 0.6], "linear"), [2 / 3, 1 / 3])
    np.testing.assert_allclose(similarity_weights([1.5, 2.0], "linear"), [0.5, 0.5])


def test_relative_weights_depend_on_the_ratio_of_the_distances_not_their_scale() -> None:
    # d / mean(d) = [2/3, 4/3]: at T = 0.5 the closer expert is worth exp(4/3) times the other
    expect = [1 / (1 + math.exp(-4 / 3)), math.exp(-4 / 3) / (1 + math.exp(-4 / 3))]
    for scale in (1e-4, 0.1, 1.0):
        np.testing.assert_allclose(similarity_weights([scale, 2 * scale], "relative", 0.5), expect)
    np.testing.assert_allclose(similarity_weights([0.0, 0.0], "relative", 0.5), [0.5, 0.5])
    # the plain softmax at the default temperature cannot tell output-layer EMDs (~1e-4) apart
    np.testing.assert_allclose(similarity_weights([1e-4, 2e-4], "softmax", 0.1), [0.5, 0.5], atol=1e-3)


def test_dissimilar_preference_turns_the_ranking_round() -> None:
    for weighting in ("softmax", "relative"):
        near_first = similarity_weights([0.1, 0.3], weighting, 0.1)
        far_first = similarity_weights([0.1, 0.3], weighting, 0.1, prefer="dissimilar")
        assert near_first[0] > near_first[1] and far_first[1] > far_first[0]
        np.testing.assert_allclose(far_first, near_first[::-1])
    np.testing.assert_allclose(similarity_weights([0.2, 0.6], "linear", prefer="dissimilar"), [0.25, 0.75])
    with pytest.raises(ValueError, match="prefer"):
        similarity_weights([0.1], "softmax", 0.1, prefer="closest")


def test_config_refuses_an_output_layer_emd_on_a_regression_output_and_unknown_choices() -> None:
    with pytest.raises(ValueError, match="emd_layer"):
        FedEFMConfig(emd_layer="output", distill_loss="mse")
    with pytest.raises(ValueError, match="emd_layer"):
        FedEFMConfig(emd_layer="logits")
    with pytest.raises(ValueError, match="prefer"):
        FedEFMConfig(prefer="nearest")
    with pytest.raises(ValueError, match="weighting"):
        FedEFMConfig(weighting="rank")
    assert FedEFMConfig(emd_layer="output", weighting="relative", prefer="dissimilar").emd_layer == "output"


def test_class_probabilities_sum_to_one_and_a_single_logit_is_bernoulli() -> None:
    torch.manual_seed(4)
    p = class_probabilities(torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(p.sum(1), torch.ones(2, 5, 5))
    logit = torch.randn(2, 1, 5, 5)
    q = class_probabilities(logit)
    assert q.shape == (2, 2, 5, 5)
    torch.testing.assert_close(q[:, 1:], torch.sigmoid(logit))
    torch.testing.assert_close(q.sum(1), torch.ones(2, 5, 5))


def test_output_layer_weighting_sees_a_head_the_feature_layer_cannot() -> None:
    """Two experts with the student's body (identical feature maps): one also has its head,
    the other a different head. The feature-layer EMD cannot tell them apart (uniform
    weights); the output-layer EMD ranks the one that predicts like the student first (or
    last, preferring the dissimilar). The student's first step sees its own body, so both
    feature EMDs are equal."""
    torch.manual_seed(5)
    student = TinySeg()
    same = copy.deepcopy(student)
    other_head = copy.deepcopy(student)
    with torch.no_grad():
        for p in other_head.head.parameters():
            p.copy_(torch.randn_like(p))
    batches = make_batches(8, n=2)
    features = distill(copy.deepcopy(student), [other_head, same], batches, seg_loss,
                       FedEFMConfig(distill_steps=1, beta=1.0))
    np.testing.assert_allclose(features.weights, [0.5, 0.5], atol=1e-6)
    output = distill(copy.deepcopy(student), [other_head, same], batches, seg_loss,
                     FedEFMConfig(distill_steps=1, beta=1.0, emd_layer="output", weighting="relative",
                                  weight_temperature=0.5))
    # not 0: the student trains in batch-norm train mode, the experts run in eval mode
    assert output.emd[1] < output.emd[0] / 10
    assert output.weights[1] > 0.8
    dissimilar = distill(copy.deepcopy(student), [other_head, same], batches, seg_loss,
                         FedEFMConfig(distill_steps=1, beta=1.0, emd_layer="output", weighting="relative",
                                      weight_temperature=0.5, prefer="dissimilar"))
    assert dissimilar.weights[0] > 0.8


# --- distillation --------------------------------------------------------------------


def test_distillation_term_is_per_pixel_kl_over_classes() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 4, generator=g)
    e = torch.randn(2, 3, 4, 4, generator=g)
    t = 2.0
    ps = torch.softmax(s / t, 1)
    pe = torch.softmax(e / t, 1)
    manual = (pe * (pe.log() - ps.log())).sum(1).mean() * t * t
    assert distillation_term(s, e, t).item() == pytest.approx(manual.item(), rel=1e-5)
    assert distillation_term(e, e, t).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_term_mse_for_regression_outputs() -> None:
    s = torch.zeros(2, 1, 3, 3)
    e = torch.full((2, 1, 3, 3), 2.0)
    assert distillation_term(s, e, 4.0, "mse").item() == pytest.approx(4.0)


def test_distillation_moves_student_towards_expert() -> None:
    torch.manual_seed(0)
    student = TinySeg()
    expert = TinySeg()
    batches = make_batches(4)
    before = mean_kl(student, expert, batches)
    cfg = FedEFMConfig(beta=1.0, distill_steps=30, lr=1e-2)
    result = distill(student, [expert], batches, seg_loss, cfg)
    after = mean_kl(student, expert, batches)
    assert result.steps == 30
    assert after < 0.5 * before
    np.testing.assert_allclose(result.weights, [1.0])


def test_distillation_leaves_experts_unchanged() -> None:
    torch.manual_seed(1)
    student, expert = TinySeg(), TinySeg()
    expert.train()
    before = copy.deepcopy(expert.state_dict())
    distill(student, [expert], make_batches(5, n=2), seg_loss, FedEFMConfig(distill_steps=3))
    assert expert.training
    for k, v in expert.state_dict().items():
        assert torch.equal(v, before[k])


def test_emd_weights_favour_the_expert_with_closer_features() -> None:
    torch.manual_seed(2)
    student = TinySeg()
    near = copy.deepcopy(student)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    far = TinySeg()
    batch = make_batches(6, n=1)[0]
    for m in (student, near, far):
        m.eval()
    with torch.no_grad():
        feats = [m.forward_features(batch["image"])[1] for m in (student, near, far)]
    w, emds = expert_weights(feats[0], feats[1:], FedEFMConfig())
    assert emds[0] < emds[1]
    assert w[0] > 0.7 and w.sum() == pytest.approx(1.0)
    result = distill(student, [far, near], [batch], seg_loss, FedEFMConfig(distill_steps=2))
    assert result.weights[1] > result.weights[0]


def test_distillation_accepts_a_batch_factory_and_cycles_it() -> None:
    torch.manual_seed(3)
    calls = []

    def factory() -> Iterator[dict[str, torch.Tensor]]:
        calls.append(1)
        return iter(make_batches(7, n=2))

    result = distill(TinySeg(), [TinySeg()], factory, seg_loss, FedEFMConfig(distill_steps=5))
    assert result.steps == 5
    assert len(calls) == 3


def test_train_for_neighbour_trains_the_copy_for_local_steps() -> None:
    torch.manual_seed(4)
    strategy = get_strategy("fedefm", {"local_steps": 4, "lr": 0.01})
    model = TinySeg()
    before = copy.deepcopy(model.state_dict())
    result = strategy.train_for_neighbour(model, make_batches(8, n=2), seg_loss)
    assert result.steps == 4 and math.isfinite(result.mean_loss)
    assert not torch.equal(model.state_dict()["head.weight"], before["head.weight"])


# --- the mixing step and the global model --------------------------------------------


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def test_fedefm_declares_the_train_request_round_trip() -> None:
    assert get_strategy("fedefm").message_kinds == (KIND_TRAIN_REQUEST, KIND_TRAIN_RESULT)


def test_pure_distillation_variant_keeps_the_distilled_model() -> None:
    torch.manual_seed(5)
    own, e1 = numpy_state(TinySeg()), numpy_state(TinySeg())
    result = get_strategy("fedefm", {"mix": 0}).aggregate(own, 10, [Contribution("e1", e1)])
    for k in own:
        assert np.array_equal(result.state[k], own[k])


def test_mixing_variant_is_half_own_half_mean_of_experts() -> None:
    torch.manual_seed(6)
    own, e1, e2 = (numpy_state(TinySeg()) for _ in range(3))
    result = get_strategy("fedefm", {"mix": 0.5}).aggregate(
        own, 10, [Contribution("e1", e1, 99), Contribution("e2", e2, 1)])
    k = "body.0.weight"
    np.testing.assert_allclose(result.state[k], 0.5 * own[k] + 0.25 * (e1[k] + e2[k]),
                               rtol=1e-5, atol=1e-6)
    assert result.weights == pytest.approx({SELF: 0.5, "e1": 0.25, "e2": 0.25})


def test_mixing_drops_a_non_finite_expert() -> None:
    torch.manual_seed(7)
    own, e1 = numpy_state(TinySeg()), numpy_state(TinySeg())
    e1["head.bias"][0] = np.inf
    result = get_strategy("fedefm").aggregate(own, 10, [Contribution("e1", e1)])
    assert "non-finite" in result.dropped["e1"]
    assert np.array_equal(result.state["head.bias"], own["head.bias"])


def test_mixing_with_median_ignores_a_poisoned_expert() -> None:
    rng = np.random.default_rng(9)
    own = {"w": rng.standard_normal(6)}
    e1 = {"w": own["w"] + 0.1}
    poisoned = {"w": np.full(6, 1e6)}
    result = get_strategy("fedefm", {"mix": 0.5, "robust": "median"}).aggregate(
        own, 1, [Contribution("e1", e1), Contribution("bad", poisoned)])
    np.testing.assert_allclose(result.state["w"], own["w"] + 0.05)  # median = e1


def test_global_model_is_the_plain_average() -> None:
    torch.manual_seed(8)
    states = [numpy_state(TinySeg()) for _ in range(3)]
    g = global_model(states)
    k = "head.weight"
    np.testing.assert_allclose(g[k], np.mean([s[k] for s in states], axis=0), rtol=1e-6)


def test_a_served_train_request_does_not_depend_on_what_the_peer_did_before() -> None:
    """A train-request's training seeds come from (round, requester), not from the peer's own
    sequence: requests reach the compute in whatever order neighbours sent them, between our
    own rounds' trainings, and the same request must give the same expert (it did not)."""
    from silomesh.models.registry import get_task
    from silomesh.peer.learner import Learner
    from silomesh.strategies.registry import get_strategy

    task = get_task("catheter")
    fed = task.make_federation(2, 0, image_size=32, n_train=16, n_test=8, n_test_source=8)

    def learner() -> Learner:
        return Learner(task, fed.silos[0], size="tiny", init_seed=3, batch_size=4, lr=1e-2,
                       strategy=get_strategy("fedefm", {}))

    def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    theirs = Learner(task, fed.silos[1], size="tiny", init_seed=4, batch_size=4, lr=1e-2,
                     strategy=get_strategy("fedefm", {})).state()
    fresh, busy = learner(), learner()
    busy.train(2)
    busy.serve_train_request(theirs, 2, request=(0, "another"))
    served = fresh.serve_train_request(theirs, 2, request=(1, "x")).state
    assert same(served, busy.serve_train_request(theirs, 2, request=(1, "x")).state)
    assert not same(served, busy.serve_train_request(theirs, 2, request=(1, "y")).state)  # the seed matters
    # and requests do not move the peer's own sequence: its next training is as if none came
    assert same(fresh.train(2).state, learner().train(2).state)
