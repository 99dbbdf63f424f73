"""FedMix: adaptive weights vs a hand-worked example, pseudo-label selection, CPS loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silomesh.strategies import (
    SELF,
    Contribution,
    PseudoLabels,
    cross_pseudo_supervision,
    fedmix_weights,
    get_strategy,
    pseudo_labels,
)
from silomesh.strategies.fedmix import dice


def test_fedmix_weights_hand_worked_example() -> None:
    # sizes 100, 300 -> shares .25, .75; losses .5, .25 with beta=2 -> .25, .0625 -> .8, .2
    # lam=1: raw .25+.8 = 1.05 and .75+.2 = .95; renormalised over 2.0 -> .525, .475
    np.testing.assert_allclose(fedmix_weights([100, 300], [0.5, 0.25], lam=1.0, beta=2.0),
                               [0.525, 0.475])


def test_fedmix_weights_default_lambda_beta_hand_worked() -> None:
    # lam=10, beta=1.5; equal sizes; losses 1 and 0 -> shares .5,.5 + 10*(1, 0) -> 10.5, .5
    np.testing.assert_allclose(fedmix_weights([5, 5], [1.0, 0.0]), [10.5 / 11, 0.5 / 11])


def test_fedmix_gives_more_weight_to_the_silo_with_higher_loss() -> None:
    w = fedmix_weights([100, 100, 100], [0.1, 0.2, 0.4])
    assert w[0] < w[1] < w[2]
    assert w.sum() == pytest.approx(1.0)


def test_fedmix_weights_fall_back_to_size_shares_when_losses_are_zero() -> None:
    np.testing.assert_allclose(fedmix_weights([1, 3], [0.0, 0.0]), [0.25, 0.75])


@pytest.mark.parametrize(("sizes", "losses"), [([1, 2], [0.1]), ([1, 2], [0.1, -1.0]),
                                               ([0, 0], [0.1, 0.2]), ([1, 2], [np.nan, 1.0])])
def test_fedmix_weights_reject_bad_input(sizes: list[int], losses: list[float]) -> None:
    with pytest.raises(ValueError):
        fedmix_weights(sizes, losses)


def test_dice_of_two_empty_masks_is_one() -> None:
    a = np.zeros((2, 3, 3), bool)
    b = a.copy()
    b[1, 0, 0] = True
    np.testing.assert_allclose(dice(a, b), [1.0, 0.0])


def square(b: int, lo: int, hi: int, size: int = 6, value: float = 0.9) -> np.ndarray:
    out = np.full((b, size, size), 0.1)
    out[:, lo:hi, lo:hi] = value
    return out


def test_pseudo_labels_keep_agreeing_samples_and_drop_disagreeing_ones() -> None:
    pa = square(2, 1, 4)  # 9 foreground pixels each
    pb = pa.copy()
    pb[1] = square(1, 3, 6)[0]  # sample 1: overlap 1 pixel -> Dice 2/18
    pl = pseudo_labels(pa, pb, tau=0.9)
    np.testing.assert_allclose(pl.agreement, [1.0, 2 / 18])
    assert pl.keep.tolist() == [True, False]
    assert pl.labels_a[0].sum() == 9


def test_pseudo_labels_are_masked_by_the_box() -> None:
    pa = square(1, 0, 6)  # network predicts the whole image
    box = np.zeros((1, 6, 6), bool)
    box[0, 2:4, 2:4] = True
    pl = pseudo_labels(pa, pa.copy(), box=box)
    assert np.array_equal(pl.labels_a, box) and np.array_equal(pl.labels_b, box)
    assert pl.keep.tolist() == [True]


def test_pseudo_labels_drop_prediction_that_fills_too_little_of_its_box() -> None:
    pa = square(1, 2, 3)  # 1 pixel inside a 16-pixel box: Dice 2/17 < 0.5
    box = np.zeros((1, 6, 6), bool)
    box[0, 1:5, 1:5] = True
    assert pseudo_labels(pa, pa.copy(), box=box).keep.tolist() == [False]
    assert pseudo_labels(pa, pa.copy(), box=box, min_box_dice=0).keep.tolist() == [True]


def test_pseudo_labels_are_empty_for_images_labelled_absent() -> None:
    pa = square(2, 1, 4)
    pl = pseudo_labels(pa, pa.copy(), present=np.array([True, False]))
    assert pl.labels_a[0].sum() == 9 and pl.labels_a[1].sum() == 0
    assert pl.keep.tolist() == [True, True]  # both agree the absent image is empty


def test_cross_pseudo_supervision_trains_each_network_on_the_other_label() -> None:
    labels_b = np.ones((2, 4, 4), bool)
    labels_a = np.zeros((2, 4, 4), bool)
    labels_a[:, :, :2] = True
    pl = PseudoLabels(labels_a, labels_b, keep=np.array([True, False]),
                      agreement=np.array([0.67, 0.67]))
    logit_a = torch.full((2, 4, 4), 10.0, requires_grad=True)  # A reproduces B's label
    logit_b = torch.where(torch.from_numpy(labels_a), 10.0, -10.0).requires_grad_(True)
    loss = cross_pseudo_supervision(logit_a, logit_b, pl)
    assert loss.item() < 1e-3
    flipped = cross_pseudo_supervision(-logit_a, logit_b, pl)  # A now predicts nothing
    assert flipped.item() > 0.99
    loss.backward()
    assert logit_a.grad is not None and torch.all(logit_a.grad[1] == 0)  # sample 1 not kept


def test_cross_pseudo_supervision_is_zero_when_nothing_is_kept() -> None:
    pl = pseudo_labels(np.zeros((1, 2, 2)), np.ones((1, 2, 2)))
    assert pl.keep.tolist() == [False]
    logit = torch.zeros((1, 2, 2), requires_grad=True)
    loss = cross_pseudo_supervision(logit, logit, pl)
    assert loss.item() == 0.0
    loss.backward()


def test_fedmix_strategy_averages_with_adaptive_weights() -> None:
    rng = np.random.default_rng(0)
    own, a, b = ({"w": rng.standard_normal(5)} for _ in range(3))
    strategy = get_strategy("fedmix")
    result = strategy.aggregate(own, 10, [Contribution("a", a, 20, loss=0.3),
                                          Contribution("b", b, 30, loss=0.6)], own_loss=0.1)
    w = fedmix_weights([10, 20, 30], [0.1, 0.3, 0.6], 10.0, 1.5)
    np.testing.assert_allclose(result.state["w"],
                               np.average(np.stack([own["w"], a["w"], b["w"]]), axis=0,
                                          weights=w))
    assert result.weights[SELF] == pytest.approx(w[0])


def test_fedmix_drops_neighbours_without_a_usable_loss() -> None:
    rng = np.random.default_rng(1)
    own, a, b, c = ({"w": rng.standard_normal(3)} for _ in range(4))
    result = get_strategy("fedmix").aggregate(
        own, 10, [Contribution("a", a, 5, loss=0.2), Contribution("b", b, 5),
                  Contribution("c", c, 5, loss=float("nan"))], own_loss=0.2)
    assert set(result.dropped) == {"b", "c"}
    assert set(result.weights) == {SELF, "a"}


def test_fedmix_requires_the_own_loss() -> None:
    with pytest.raises(ValueError, match="own_loss"):
        get_strategy("fedmix").aggregate({"w": np.zeros(2)}, 1, [])
