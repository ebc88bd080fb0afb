"""Fold-fitted pieces: OmicTransform, TimeBins, generated splits, and that validation data never leaks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from preprocessing.omics.labels import TimeBins, fold_time_bins
from preprocessing.omics.splits import check_splits, generate_splits
from preprocessing.omics.transforms import OmicTransform, cox_score_z, fit_fold


def cohort(n: int = 120, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest (patient, time, event) and features with raw RSEM-like RNA, CNV calls and 0/1 mutations."""
    rng = np.random.default_rng(seed)
    patients = [f"TCGA-AA-{i:04d}" for i in range(n)]
    manifest = pd.DataFrame({"patient": patients, "time": rng.exponential(30, n).round(2),
                             "event": (rng.random(n) < 0.4).astype(np.int64)})
    rna = rng.lognormal(mean=np.linspace(2, 8, 30), sigma=np.linspace(0.1, 2.0, 30), size=(n, 30))
    cnv = rng.integers(-2, 3, size=(n, 10)).astype(float)
    mut = (rng.random((n, 8)) < np.linspace(0.02, 0.5, 8)).astype(float)
    features = pd.DataFrame(
        np.hstack([rna, cnv, mut]),
        index=pd.Index(patients, name="patient"),
        columns=[f"rna:G{i}" for i in range(30)] + [f"cnv:C{i}" for i in range(10)]
        + [f"mut:M{i}" for i in range(8)],
    )
    features.iloc[:15, 30:40] = np.nan  # patients with RNA but no CNV
    return manifest, features


def same_state(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def test_transform_fits_training_rows_and_cleans_output() -> None:
    _, features = cohort()
    train, val = features.iloc[:90], features.iloc[90:]
    tf = OmicTransform(max_features_per_modality=5).fit(train)
    assert tf.log_rna_applied_  # raw expression (max > 100, no negatives) is logged
    out = tf.transform(val)
    assert out.dtypes.eq(np.float32).all() and not out.isna().any().any()
    assert list(out.index) == list(val.index) and list(out.columns) == tf.feature_names_
    assert {m: len(c) for m, c in tf.modalities_.items()} == {"rna": 5, "cnv": 5, "mut": 5}
    # MAD of the training rows on log2(x+1): widest-spread genes (drawn in the last columns) win, in order
    logged = np.log2(train[[f"rna:G{i}" for i in range(30)]].to_numpy() + 1)
    mad = np.median(np.abs(logged - np.median(logged, axis=0)), axis=0)
    assert tf.modalities_["rna"] == [f"rna:G{i}" for i in sorted(np.argsort(-mad)[:5])]
    assert all(int(c.split(":G")[1]) >= 20 for c in tf.modalities_["rna"])
    # mutations: ranked by variance (frequency nearest 50%), not scaled
    assert tf.modalities_["mut"] == [f"mut:M{i}" for i in range(3, 8)]
    assert set(np.unique(out[tf.modalities_["mut"]])) <= {0.0, 1.0}
    fitted = tf.transform(train)
    observed = train["cnv:C0"].notna()
    assert fitted["rna:G29"].mean() == pytest.approx(0, abs=1e-5)
    assert fitted["rna:G29"].std(ddof=0) == pytest.approx(1, rel=1e-4)
    median = np.nanmedian(train["cnv:C0"])
    imputed = (median - train["cnv:C0"].mean()) / train["cnv:C0"].std(ddof=0)
    assert fitted.loc[~observed, "cnv:C0"].to_numpy() == pytest.approx(imputed, rel=1e-5)


def test_log_decision_and_state_roundtrip() -> None:
    _, features = cohort()
    zscored = features.copy()
    rna = [c for c in features.columns if c.startswith("rna:")]
    zscored[rna] = (np.log2(features[rna] + 1) - 5) / 2  # logged and centred: has negatives
    assert not OmicTransform().fit(zscored).log_rna_applied_
    assert not OmicTransform(log_rna="never").fit(features).log_rna_applied_
    tf = OmicTransform(max_features_per_modality=4, select_by="variance").fit(features.iloc[:60])
    state = tf.state_dict()
    again = OmicTransform.from_state_dict(state)
    pd.testing.assert_frame_equal(tf.transform(features), again.transform(features))
    assert again.modalities_ == tf.modalities_ and same_state(again.state_dict(), state)
    with pytest.raises(ValueError):
        OmicTransform(log_rna="maybe")


def test_time_bins_use_uncensored_training_times() -> None:
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 500, 600.0])
    event = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    bins = TimeBins(4).fit(time, event)
    assert bins.cuts_ == pytest.approx(np.quantile(time[:8], [0.25, 0.5, 0.75]).tolist())
    assert bins.edges_[0] == -np.inf and bins.edges_[-1] == np.inf
    assert bins.transform([0.0, 1.0, 2.75, 4.5, 1e6]).tolist() == [0, 0, 1, 2, 3]
    restored = TimeBins.from_state_dict(bins.state_dict())
    assert restored.transform(time).tolist() == bins.transform(time).tolist()


def test_validation_changes_leave_fitted_state_unchanged() -> None:
    manifest, features = cohort()
    splits = generate_splits(manifest, n_folds=4, seed=1)
    params = {"max_features_per_modality": 6}
    state = {k: fit_fold(features, splits, k, **params).state_dict() for k in range(4)}
    bins = {k: b.state_dict() for k, b in fold_time_bins(manifest, splits).items()}
    for k in range(4):
        val = splits.loc[(splits["fold"] == k) & (splits["role"] == "val"), "patient"]
        features2, manifest2 = features.copy(), manifest.copy()
        features2.loc[val] *= 1000
        features2.loc[val[: len(val) // 2]] = np.nan
        is_val = manifest2["patient"].isin(val)
        manifest2.loc[is_val, "time"] = manifest2.loc[is_val, "time"] * 7 + 1
        manifest2.loc[is_val, "event"] = 1 - manifest2.loc[is_val, "event"]
        assert same_state(fit_fold(features2, splits, k, **params).state_dict(), state[k])
        assert fold_time_bins(manifest2, splits)[k].state_dict() == bins[k]
        # the same perturbation seen by a whole-cohort fit does change what is learned
        assert not same_state(OmicTransform(**params).fit(features2).state_dict(), state[k])
        assert TimeBins(4).fit(manifest2["time"], manifest2["event"]).state_dict() != bins[k]


def test_generated_splits_are_seeded_stratified_patient_level() -> None:
    manifest, _ = cohort(n=203)
    a = generate_splits(manifest, n_folds=5, seed=11)
    check_splits(a, manifest["patient"])
    pd.testing.assert_frame_equal(a, generate_splits(manifest, n_folds=5, seed=11))
    assert not a.equals(generate_splits(manifest, n_folds=5, seed=12))
    val = a[a["role"] == "val"]
    assert val["patient"].is_unique and set(val["patient"]) == set(manifest["patient"])
    assert val.groupby("fold").size().between(40, 41).all()
    events = manifest.set_index("patient")["event"]
    per_fold = val.groupby("fold")["patient"].apply(lambda p: events[p].sum())
    assert per_fold.max() - per_fold.min() <= 1  # events spread evenly
    # and every event x time-bin stratum is spread evenly over the validation folds
    stratum = manifest["event"] * 4 + TimeBins(4).fit_transform(manifest["time"], manifest["event"])
    of_patient = dict(zip(manifest["patient"], stratum, strict=True))
    counts = pd.crosstab(val["fold"], val["patient"].map(of_patient))
    assert counts.shape == (5, 8) and (counts.max() - counts.min()).max() <= 1


def test_generated_splits_survive_tiny_cohorts() -> None:
    manifest = pd.DataFrame({"patient": [f"TCGA-AA-{i:04d}" for i in range(6)],
                             "time": [1.0, 2, 3, 4, 5, 6], "event": [1, 0, 0, 0, 0, 0]})
    splits = generate_splits(manifest, n_folds=3, seed=0)
    check_splits(splits, manifest["patient"])
    # fewer deaths than folds: each death still goes to a different held-out fold (a plain K-fold
    # bunched them, leaving more folds without a death and so without a c-index)
    rng = np.random.default_rng(0)
    few = pd.DataFrame({"patient": [f"TCGA-AA-{i:04d}" for i in range(40)], "time": rng.uniform(1, 50, 40),
                        "event": (np.arange(40) % 10 == 0).astype(int)})
    for seed in range(20):
        val = generate_splits(few, n_folds=5, seed=seed).query("role == 'val'")
        deaths = val.merge(few, on="patient").groupby("fold")["event"].sum()
        assert sorted(deaths) == [0, 1, 1, 1, 1]
    one_class = few.assign(event=0)
    check_splits(generate_splits(one_class, n_folds=5, seed=0), one_class["patient"])


def _cox_score_z_by_hand(x: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Score test of beta = 0 for one covariate, risk sets written out one death at a time."""
    u = info = 0.0
    for i in np.flatnonzero(event):
        at_risk = x[time >= time[i]]
        u += x[i] - at_risk.mean()
        info += at_risk.var()
    return u / np.sqrt(info)


def test_cox_score_z_matches_the_textbook_sum_with_ties() -> None:
    rng = np.random.default_rng(3)
    time = rng.integers(1, 15, 60).astype(float)  # many tied times
    event = (rng.random(60) < 0.6).astype(float)
    x = rng.normal(size=(60, 4))
    x[:, 0] = -time + rng.normal(0, 2, 60)  # higher value, shorter survival
    z = cox_score_z(x, time, event)
    expected = [_cox_score_z_by_hand(x[:, j], time, event) for j in range(4)]
    np.testing.assert_allclose(z, expected, rtol=1e-9)
    assert z[0] > 4 and np.all(np.abs(z[1:]) < 3)


def test_cox_screen_keeps_prognostic_genes_and_ignores_held_out_labels() -> None:
    rng = np.random.default_rng(4)
    n = 80
    risk = rng.normal(size=n)
    time = rng.exponential(10 * np.exp(-risk))
    event = (rng.random(n) < 0.7).astype(int)
    values = rng.normal(size=(n, 12))
    values[:, 5] += 2 * risk  # the one prognostic gene, not the most variable one
    values[:, 0] *= 5  # the most variable gene carries no signal
    frame = pd.DataFrame(values, columns=[f"rna:G{j}" for j in range(12)])
    screen = OmicTransform(max_features_per_modality=1, select_by="cox").fit(
        frame[:60], time[:60], event[:60]
    )
    assert screen.feature_names_ == ["rna:G5"]
    by_mad = OmicTransform(max_features_per_modality=1, select_by="mad").fit(frame[:60])
    assert by_mad.feature_names_ == ["rna:G0"]
    # healnet's fold fit reads only the training patients' survival: held-out survival rewritten to
    # follow gene G3 exactly (which a fit over every row would pick up) changes nothing
    from healnet.config import validate_config
    from healnet.settings import settings_from_config
    from healnet.training.fold import fit_omics

    frame.index = pd.Index([f"P{i}" for i in range(n)], name="patient")
    survival = pd.DataFrame({"time": time, "event": event}, index=frame.index)
    scrambled = survival.copy()
    scrambled.iloc[50:] = np.c_[np.exp(-3 * values[50:, 3]), np.ones(n - 50)]
    leaky = OmicTransform(max_features_per_modality=2, select_by="cox")
    assert "rna:G3" in leaky.fit(frame, *scrambled.to_numpy().T).feature_names_
    training = settings_from_config(validate_config(
        {"cohorts": {"X": {"demo": True}}, "training": {"omic_max_features": 2, "omic_select_by": "cox"}}
    )).training
    train = list(frame.index[:50])
    assert (
        fit_omics(frame, train, training, survival).columns
        == fit_omics(frame, train, training, scrambled).columns
    )
    with pytest.raises(ValueError, match="needs time and event"):
        OmicTransform(max_features_per_modality=1, select_by="cox").fit(frame)
