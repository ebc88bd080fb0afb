"""HEALNet's attention, read back from trained fold checkpoints and drawn for a reader.

Each held-out patient is run through the checkpoint of the fold that held it out (so the picture shows
what a model that never saw the patient attended to). The cross-attention weights from the latent
array to each modality's tokens are averaged over layers, heads and latents, giving one weight per
patch (drawn over the slide thumbnail) and one per omic token (genes with ``omic_tokens: gene``,
rna/cnv/mut with ``modality``). Because a token need not be a gene, and a per-fold feature screen
keeps different genes in different folds, the omic figure also ranks input features by gradient x
input of the predicted risk, matched by feature name across folds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from healnet.report.figure_files import message_figure, save_figure  # noqa: E402
from preprocessing.features.store import read_store  # noqa: E402
from preprocessing.omics.directory import load_omics_dir  # noqa: E402
from preprocessing.tiling.tiles import read_tiles  # noqa: E402

log = logging.getLogger(__name__)

MAX_OMIC_PATIENTS = 300  # omic attention is averaged over at most this many held-out patients
WSI_COLUMNS = 3  # slide panels per row of attention_wsi.png


def read_bag(features_dir: Path, slides: list[str]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """A patient's patch features (float32, slides concatenated) and (slide, coords) per non-empty slide.

    Slides without a store are skipped, as in training; the heatmaps need each slide's own coords.
    """
    feats, coords = [], []
    for stem in slides:
        path = features_dir / f"{stem}.zarr"
        if path.exists():
            slide_feats, slide_coords = read_store(path)
            if len(slide_feats):
                feats.append(slide_feats.astype(np.float32))
                coords.append((stem, slide_coords))
    if not feats:
        return np.zeros((0, 0), np.float32), []
    return np.concatenate(feats), coords


def mean_attention(weights: list[torch.Tensor]) -> np.ndarray:
    """Per-token attention of sample 0: mean over layers, heads and latents."""
    return torch.stack([w[0].float().mean(dim=(0, 1)) for w in weights]).mean(0).cpu().numpy()


def _omic_inputs(ckpt: dict[str, Any], features: pd.DataFrame, patients: list[str]) -> np.ndarray:
    """The fold's fitted omic transform applied to these patients, in the model's column order."""
    from preprocessing.omics.transforms import OmicTransform

    transform = OmicTransform.from_state_dict(ckpt["omic_transform"])
    out = transform.transform(features.loc[patients])
    return out[ckpt["feature_names"]].to_numpy(np.float32)


def omic_attribution(model: torch.nn.Module, omics: np.ndarray) -> np.ndarray:
    """Gradient x input of the risk (-sum of survival) for each omic feature of one patient, WSI absent.

    Positive values push the predicted risk up. Computed with the slide branch skipped so that the
    number reads as "what the omic input alone contributes" for every patient alike.
    """
    from healnet.models.loss import risk_from_logits

    x = torch.from_numpy(omics)[None].requires_grad_(True)
    with torch.enable_grad():
        logits = model(None, None, x, torch.tensor([False]), torch.tensor([True]))
        risk_from_logits(logits).sum().backward()
    return (x.grad * x).detach()[0].numpy()


def patient_attention(model: torch.nn.Module, ckpt: dict[str, Any], bag: np.ndarray, coords: np.ndarray,
                      omics: np.ndarray | None) -> dict[str, np.ndarray]:
    """Run one patient (bag may be empty, omics may be None) and return per-token attention.

    ``coords`` (N x 2, level-0 px) feed the Fourier position encoding when the model uses one.
    """
    has_wsi = bag.shape[0] > 0 and ckpt.get("wsi_dim") is not None
    has_omics = omics is not None and bool(ckpt.get("feature_names"))
    wsi = torch.from_numpy(bag)[None] if has_wsi else None
    wsi_coords = torch.from_numpy(coords.astype(np.float32))[None] if has_wsi else None
    omic = torch.from_numpy(omics)[None] if has_omics else None
    with torch.inference_mode():
        _, attention = model(wsi, None, omic, torch.tensor([has_wsi]), torch.tensor([has_omics]),
                             return_attention=True, wsi_coords=wsi_coords)
    out = {}
    if has_wsi and attention.get("wsi"):
        out["wsi"] = mean_attention(attention["wsi"])
    if has_omics and attention.get("omics"):
        out["omics"] = mean_attention(attention["omics"])
    return out


def _slide_file(stem: str, tiles_dir: Path, slides_dir: Path | None) -> tuple[Path | None, dict[str, Any]]:
    tiles_path = tiles_dir / f"{stem}.parquet"
    meta = read_tiles(tiles_path)[1] if tiles_path.exists() else {}
    candidates = [Path(meta["slide_path"])] if meta.get("slide_path") else []
    if slides_dir is not None and slides_dir.is_dir():
        candidates += sorted(slides_dir.glob(f"{stem}.*")) + [slides_dir / stem]
    return next((p for p in candidates if p.exists()), None), meta


def draw_slide_attention(ax: plt.Axes, slide_path: Path, meta: dict[str, Any], coords: np.ndarray,
                         weights: np.ndarray, title: str) -> matplotlib.image.AxesImage:
    """Thumbnail with each patch tinted by its attention (rank-scaled so the map uses the full range);
    returns the attention layer, for a colour bar."""
    from preprocessing.slides.reader import open_slide

    with contextlib.closing(open_slide(slide_path)) as slide:
        width = slide.dimensions[0]
        thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
    scale = thumb.shape[1] / width
    heat = np.full(thumb.shape[:2], np.nan, np.float32)
    ranks = (np.argsort(np.argsort(weights)) + 0.5) / max(len(weights), 1)
    side = max(1, int(round(float(meta.get("patch_size_level0", 256)) * scale)))
    for (x, y), value in zip(coords, ranks, strict=True):
        x0, y0 = int(float(x) * scale), int(float(y) * scale)
        heat[y0:y0 + side, x0:x0 + side] = value
    ax.imshow(thumb)
    shown = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    ax.set_title(title, fontsize=12)
    ax.axis("off")
    return shown


def draw_attention_figures(models_dir: Path | None, predictions: pd.DataFrame, omics_dir: Path,
                           features_dir: Path,
                           tiles_dir: Path, slides_dir: Path | None, wsi_path: Path, omics_path: Path,
                           n_slides: int = 3, top_features: int = 15) -> None:
    """Write the WSI attention panel and the omic attention bar chart for a cohort's HEALNet.

    ``models_dir`` holds HEALNet's ``fold{k}.pt`` (None: HEALNet is not among the models reported);
    ``predictions`` its held-out risks (all settings), used to pick the highest- and lowest-risk
    patients to draw.
    """
    from healnet.data.checkpoints import load_checkpoint

    checkpoints = sorted(models_dir.glob("fold*.pt")) if models_dir is not None else []
    if not checkpoints:
        why = (f"no HEALNet checkpoints in {models_dir}" if models_dir is not None
               else "HEALNet is not among the reported models") + " (is healnet in `models`?)"
        message_figure(wsi_path, "HEALNet attention on slides", why)
        message_figure(omics_path, "HEALNet omic attention", why)
        return
    tables = load_omics_dir(omics_dir)
    manifest, features = tables.manifest, tables.features
    preds = predictions[predictions["setting"] == "full"]

    omic_rows: list[dict[str, float]] = []       # per patient: token -> attention / uniform attention
    gene_rows: list[dict[str, float]] = []       # per patient: feature -> |gradient x input|
    panels: list[dict[str, Any]] = []
    wanted = _patients_to_draw(manifest, preds, n_slides)
    for path in checkpoints:
        model, ckpt = load_checkpoint(path)
        test = [p for p in ckpt["test_patients"] if p in manifest.index]
        with_omics = [p for p in test if bool(manifest.at[p, "has_omics"]) and p in features.index]
        omic_of: dict[str, np.ndarray] = {}
        if with_omics and ckpt["feature_names"]:
            omic_of = dict(zip(with_omics, _omic_inputs(ckpt, features, with_omics), strict=True))
        token_names = model.omic_tokenizer.token_names(ckpt["feature_names"]) if omic_of else []
        for patient in test:
            draw = patient in wanted
            if not draw and (patient not in omic_of or len(omic_rows) >= MAX_OMIC_PATIENTS):
                continue
            bag, slide_coords = read_bag(features_dir, list(manifest.at[patient, "slides"]))
            all_coords = np.concatenate([c for _, c in slide_coords]) if slide_coords else np.zeros((0, 2))
            att = patient_attention(model, ckpt, bag, all_coords, omic_of.get(patient))
            if "omics" in att and len(omic_rows) < MAX_OMIC_PATIENTS:
                omic_rows.append(dict(zip(token_names, att["omics"] * len(token_names), strict=True)))
                grads = omic_attribution(model, omic_of[patient])
                gene_rows.append(dict(zip(ckpt["feature_names"], np.abs(grads), strict=True)))
            if draw and "wsi" in att:
                start = 0
                for stem, coords in slide_coords:
                    panels.append({"patient": patient, "slide": stem, "coords": coords,
                                   "weights": att["wsi"][start:start + len(coords)], "fold": ckpt["fold"],
                                   "group": wanted[patient]})
                    start += len(coords)
    _draw_wsi_panels(one_panel_per_patient(panels, wanted, n_slides), tiles_dir, slides_dir, wsi_path)
    _draw_omic_bars(omic_rows, gene_rows, top_features, omics_path)


def one_panel_per_patient(panels: list[dict[str, Any]], wanted: dict[str, str],
                          n: int) -> list[dict[str, Any]]:
    """The panels to draw: each chosen patient's slide with the most patches, in the order the
    patients were chosen (highest risk, lowest risk, ...), at most ``n``.

    Panels arrive in fold order with one per slide, so cutting that list would let a patient with
    several slides, or the patients of the first folds, take every place.
    """
    best: dict[str, dict[str, Any]] = {}
    for panel in panels:
        kept = best.get(panel["patient"])
        if kept is None or len(panel["coords"]) > len(kept["coords"]):
            best[panel["patient"]] = panel
    return [best[p] for p in wanted if p in best][:n]


def _patients_to_draw(manifest: pd.DataFrame, preds: pd.DataFrame, n: int) -> dict[str, str]:
    """Held-out patients with slides, alternating highest and lowest predicted risk."""
    if n <= 0:
        return {}
    with_wsi = set(manifest.index[manifest["has_wsi"].astype(bool)])
    ranked = preds[preds["patient"].isin(with_wsi)].sort_values("risk")
    if ranked.empty:
        return {p: "held out" for p in sorted(with_wsi)[:n]}
    high = list(ranked["patient"][::-1])
    low = list(ranked["patient"])
    chosen: dict[str, str] = {}
    while len(chosen) < min(n, len(ranked)):
        for pool, label in [(high, "highest predicted risk"), (low, "lowest predicted risk")]:
            while pool and pool[0] in chosen:
                pool.pop(0)
            if pool and len(chosen) < n:
                chosen[pool.pop(0)] = label
    return chosen


def _draw_wsi_panels(panels: list[dict[str, Any]], tiles_dir: Path, slides_dir: Path | None,
                     path: Path) -> None:
    drawable = []
    for panel in panels:
        slide_path, meta = _slide_file(panel["slide"], tiles_dir, slides_dir)
        if slide_path is not None:
            drawable.append((panel, slide_path, meta))
    if not drawable:
        message_figure(path, "HEALNet attention on slides",
                       "no held-out patient with a readable slide and a WSI-trained HEALNet")
        return
    # At most WSI_COLUMNS panels a row and small panels: the report shows a figure at about 1000 px
    # wide, so a wider figure is scaled down and its titles become unreadable.
    ncols = min(WSI_COLUMNS, len(drawable))
    nrows = math.ceil(len(drawable) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols + 0.8, 3.4 * nrows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, (panel, slide_path, meta) in zip(axes.flat, drawable, strict=False):
        title = f"{panel['slide'][:23]}\n{panel['group']}\nheld out in fold {panel['fold']}"
        shown = draw_slide_attention(ax, slide_path, meta, panel["coords"], panel["weights"], title)
    for ax in list(axes.flat)[len(drawable):]:
        ax.axis("off")
    # One colour bar for all panels (the scale is the same: rank within each slide).
    bar = fig.colorbar(shown, ax=axes, fraction=0.03, pad=0.02, shrink=0.8)
    bar.set_label("attention (rank within slide)", fontsize=11)
    fig.suptitle("HEALNet cross-attention from the latent array to each patch", fontsize=14)
    save_figure(fig, path)


def _mean_by_name(rows: list[dict[str, float]]) -> pd.Series:
    """Mean per name over all patients; a name absent from a patient's fold (its screen dropped that
    feature, so it had no influence there) counts as 0."""
    return pd.DataFrame(rows).fillna(0.0).mean(axis=0).sort_values(ascending=False)


def _bar_panel(ax: plt.Axes, values: pd.Series, colour: str, xlabel: str, title: str) -> None:
    """Horizontal bars of ``values``, largest on top, labelled by its index."""
    ax.barh(range(len(values))[::-1], values.to_numpy(), color=colour)
    ax.set_yticks(range(len(values))[::-1], list(values.index), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)


def _draw_omic_bars(attention: list[dict[str, float]], attribution: list[dict[str, float]], top: int,
                    path: Path) -> None:
    if not attention:
        message_figure(path, "HEALNet omic attention", "HEALNet was trained without omics, or no held-out "
                       "patient had omics")
        return
    tokens = _mean_by_name(attention).head(top)
    genes = _mean_by_name(attribution).head(top)
    rows = max(len(tokens), len(genes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.32 * rows + 1.8), layout="constrained")
    _bar_panel(left, tokens, "tab:purple", "mean attention / uniform attention\n(1 = no preference)",
               "Omic tokens attended to most")
    left.axvline(1.0, ls="--", color="k", lw=0.8)
    _bar_panel(right, genes, "tab:green", "mean |gradient x input| of the predicted risk",
               "Omic features that moved the risk most")
    fig.suptitle(f"HEALNet and the omics of {len(attention)} held-out patients", fontsize=12)
    save_figure(fig, path)
