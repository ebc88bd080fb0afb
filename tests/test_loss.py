"""Discrete-time survival loss and the fold metrics, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.nonparametric import kaplan_meier_estimator

from healnet.evaluation.metrics import fold_metrics, survival_at, survival_knots
from healnet.models.loss import (
    inverse_frequency_weights,
    nll_survival_loss,
    risk_from_logits,
    survival_from_logits,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_nll_matches_a_hand_computed_example() -> None:
    # Patient A: every hazard 0.5 (logit 0); event observed in bin 1.
    #   S = [0.5, 0.25, 0.125, 0.0625]; L_unc = -log S_0 - log h_1 = -log 0.5 - log 0.5 = 2 ln 2 = 1.386294
    #   loss_A = (1 - 0.4) * 1.386294 + 0.4 * 1.386294 = 1.386294
    # Patient B: hazards 0.25 (logit ln(1/3)); censored in bin 2.
    #   S = [0.75, 0.5625, 0.421875, 0.31640625]; L_cens = -log S_2 = -log 0.421875 = 0.863046
    #   loss_B = (1 - 0.4) * 0.863046 = 0.517828
    # mean = (1.386294 + 0.517828) / 2 = 0.952061
    logits = torch.tensor([[0.0] * 4, [math.log(1 / 3)] * 4])
    bins, events = torch.tensor([1, 2]), torch.tensor([1, 0])
    loss = nll_survival_loss(logits, bins, events, alpha=0.4)
    assert loss.item() == pytest.approx(0.952061, abs=1e-5)
    # alpha = 0: plain likelihood, (1.386294 + 0.863046) / 2 = 1.124670
    assert nll_survival_loss(logits, bins, events, alpha=0.0).item() == pytest.approx(1.124670, abs=1e-5)
    # per-patient weights 2 and 0: only A counts, doubled, averaged over 2 patients -> 1.386294
    weighted = nll_survival_loss(logits, bins, events, alpha=0.4, weights=torch.tensor([2.0, 0.0]))
    assert weighted.item() == pytest.approx(1.386294, abs=1e-5)


def test_event_in_the_first_bin_and_censoring_in_the_last() -> None:
    # h = 0.5: event in bin 0 -> -log h_0 = ln 2; censored in bin 3 -> -log S_3 = 4 ln 2, times (1 - alpha)
    logits = torch.zeros(2, 4)
    loss = nll_survival_loss(logits, torch.tensor([0, 3]), torch.tensor([1, 0]), alpha=0.4)
    assert loss.item() == pytest.approx((math.log(2) + 0.6 * 4 * math.log(2)) / 2, abs=1e-6)


def test_survival_and_risk() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(1 / 3)] * 4])
    surv = survival_from_logits(logits)
    torch.testing.assert_close(surv[0], torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    torch.testing.assert_close(surv[1], torch.tensor([0.75, 0.5625, 0.421875, 0.31640625]))
    # risk = -sum S: -0.9375 and -2.05078125; higher hazards -> higher risk
    torch.testing.assert_close(risk_from_logits(logits), torch.tensor([-0.9375, -2.05078125]))


def test_loss_is_finite_for_extreme_logits_and_has_gradients() -> None:
    logits = torch.tensor([[80.0, -80.0, 80.0, -80.0], [-80.0] * 4], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([3, 3]), torch.tensor([1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_inverse_frequency_weights() -> None:
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), n_bins=4)
    # counts 3 and 1 -> raw weights 4/(2*3) and 4/(2*1) = 2/3 and 2, already mean 1
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2.0], rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)


def test_survival_knots_and_interpolation() -> None:
    knots = survival_knots(np.array([-np.inf, 10.0, 20.0, 30.0, np.inf]), n_bins=4, t_max=50.0)
    np.testing.assert_allclose(knots, [0, 10, 20, 30, 50])
    surv = survival_at(np.array([[0.8, 0.6, 0.4, 0.2]]), knots, np.array([0.0, 5.0, 10.0, 25.0, 60.0]))
    np.testing.assert_allclose(surv, [[1.0, 0.9, 0.8, 0.5, 0.2]])


def test_fold_metrics_perfect_ranking_and_undefined_folds() -> None:
    rng = np.random.default_rng(0)
    train_t, train_e = rng.uniform(1, 100, 60), rng.random(60) < 0.6
    test_t = np.linspace(5, 90, 30)
    test_e = np.arange(30) % 3 != 0
    risk = -test_t  # earlier death -> higher risk: perfectly concordant
    surv_fn = lambda times: np.exp(-np.outer(1 / test_t, times))  # noqa: E731
    rows = {r["metric"]: r for r in fold_metrics(train_t, train_e, test_t, test_e, risk, surv_fn)}
    assert set(rows) == {"c_index", "ipcw_c_index", "ibs", "td_auc", "ibs_kaplan_meier"}
    assert rows["c_index"]["value"] == pytest.approx(1.0)
    assert rows["ipcw_c_index"]["value"] == pytest.approx(1.0)
    assert rows["td_auc"]["value"] == pytest.approx(1.0)
    assert 0 < rows["ibs"]["value"] < 0.25
    # the Kaplan-Meier yardstick: the training curve given to every test patient as its prediction
    # scores exactly the reference
    km_time, km_surv = kaplan_meier_estimator(train_e, train_t)
    km_fn = lambda times: np.tile([km_surv[km_time <= t][-1] if (km_time <= t).any() else 1.0  # noqa: E731
                                   for t in times], (30, 1))
    as_km = {r["metric"]: r for r in fold_metrics(train_t, train_e, test_t, test_e, risk, km_fn)}
    assert as_km["ibs"]["value"] == pytest.approx(rows["ibs_kaplan_meier"]["value"])
    assert rows["ibs"]["value"] < rows["ibs_kaplan_meier"]["value"]  # an informative curve beats it
    # no events in the held-out fold: NaN with a note, no exception
    rows = {r["metric"]: r for r in fold_metrics(train_t, train_e, test_t, np.zeros(30, bool), risk, surv_fn)}
    assert np.isnan(rows["c_index"]["value"]) and "no events" in rows["c_index"]["note"]
    assert np.isnan(rows["td_auc"]["value"])
    # test times beyond the training follow-up are censored there instead of crashing the IPCW metrics
    rows = {r["metric"]: r for r in fold_metrics(train_t, train_e, test_t * 2, test_e, risk, surv_fn)}
    assert np.isfinite(rows["ipcw_c_index"]["value"]) and np.isfinite(rows["ibs"]["value"])
