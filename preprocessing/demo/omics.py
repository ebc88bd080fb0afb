"""Omic values and survival times of the synthetic demo cohort (no pixels: cheap enough for parse time).

Expression follows a small latent-programme model (proliferation, immune, stromal, NRF2) so genes
correlate as in real tumours; copy number is GISTIC-like calls driven by shared arm-level events; the
mutation table uses lung-adenocarcinoma-like rates. A few named features carry the planted prognostic
signal (see :data:`OMIC_SIGNAL`); survival is drawn from a Weibull proportional-hazards model whose log
hazard ratio is ``true_risk`` and censoring is set to an exact share of the cohort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Expression genes (real HGNC symbols); the first 200 form the RNA table.
RNA_GENES: tuple[str, ...] = (
    "TP53", "EGFR", "KRAS", "STK11", "KEAP1", "NF1", "BRAF", "PIK3CA", "PTEN", "RB1",
    "CDKN2A", "SMARCA4", "ARID1A", "ATM", "MET", "ERBB2", "ALK", "ROS1", "RET", "NKX2-1",
    "MYC", "MYCL", "CCND1", "CDK4", "CDK6", "MDM2", "SOX2", "TERT", "FGFR1", "KIT",
    "PDGFRA", "VEGFA", "KDR", "HIF1A", "EPAS1", "NOTCH1", "NOTCH2", "JAG1", "HES1", "CTNNB1",
    "APC", "AXIN2", "WNT5A", "SMAD4", "TGFB1", "TGFBR2", "BMP4", "SNAI2", "TWIST1", "ZEB1",
    "VIM", "CDH1", "CDH2", "EPCAM", "KRT5", "KRT7", "KRT8", "KRT18", "KRT19", "MUC1",
    "NAPSA", "SFTPC", "SFTPB", "SFTPA1", "SCGB1A1", "TP63", "MKI67", "TOP2A", "PCNA", "MCM2",
    "MCM7", "CCNB1", "CCNE1", "CDC20", "AURKA", "AURKB", "PLK1", "BUB1", "BIRC5", "E2F1",
    "FOXM1", "CDKN1A", "CDKN1B", "GADD45A", "BAX", "BCL2", "BCL2L1", "MCL1", "CASP3", "CASP8",
    "FAS", "TNF", "IL6", "IL1B", "CXCL8", "CXCL12", "CXCR4", "CCL2", "CD274", "PDCD1",
    "CTLA4", "LAG3", "HAVCR2", "CD8A", "CD4", "CD3E", "FOXP3", "GZMB", "PRF1", "IFNG",
    "STAT1", "STAT3", "JAK1", "JAK2", "IRF1", "HLA-A", "B2M", "CD68", "CD163", "PTPRC",
    "MS4A1", "CD19", "COL1A1", "COL1A2", "COL3A1", "FN1", "SPARC", "POSTN", "ACTA2", "FAP",
    "PDGFRB", "THY1", "MMP2", "MMP9", "TIMP1", "LOX", "SERPINE1", "PLAU", "PECAM1", "VWF",
    "CDH5", "ESR1", "AR", "GATA3", "FOXA1", "HNF1B", "NFE2L2", "NQO1", "GCLM", "TXNRD1",
    "HMOX1", "G6PD", "SLC7A11", "AKR1C1", "ALDH3A1", "GPX2", "CYP24A1", "GAPDH", "ACTB", "TUBB",
    "HPRT1", "PGK1", "LDHA", "ENO1", "PKM", "HK2", "SLC2A1", "CA9", "PPARG", "MTOR",
    "AKT1", "PIK3R1", "TSC2", "MAP2K1", "MAPK1", "JUN", "FOS", "EGR1", "DUSP6", "SPRY4",
    "ETV4", "ERBB3", "NRG1", "HRAS", "NRAS", "PTPN11", "RBM10", "U2AF1", "SETD2", "KMT2D",
    "BRCA1", "BRCA2", "RAD51", "CHEK2", "MLH1", "MSH2", "PARP1", "BAP1", "YAP1", "ASCL1",
)

#: Copy-number genes (GISTIC-like calls).
CNV_GENES: tuple[str, ...] = (
    "TP53", "EGFR", "KRAS", "STK11", "KEAP1", "NF1", "BRAF", "PIK3CA", "PTEN", "RB1",
    "CDKN2A", "CDKN2B", "MTAP", "SMARCA4", "ARID1A", "ATM", "MET", "ERBB2", "ALK", "ROS1",
    "RET", "NKX2-1", "MYC", "MYCL", "CCND1", "CDK4", "CDK6", "MDM2", "SOX2", "TERT",
    "FGFR1", "KIT", "PDGFRA", "KDR", "HIF1A", "NOTCH1", "CTNNB1", "APC", "SMAD4", "TGFBR2",
    "CDH1", "TP63", "CCNE1", "AURKA", "E2F1", "CDKN1B", "BCL2L1", "MCL1", "CD274", "PDCD1LG2",
    "JAK2", "B2M", "FHIT", "WWOX", "PTPRD", "LRP1B", "CSMD1", "PDE4D", "MACROD2", "PARK7",
    "NFE2L2", "ERBB3", "NRG1", "NRAS", "HRAS", "MAP2K1", "AKT1", "AKT2", "PIK3R1", "TSC1",
    "TSC2", "BRCA1", "BRCA2", "RAD51", "CHEK2", "BAP1", "YAP1", "NF2", "LATS2", "SETD2",
    "PBRM1", "KMT2C", "KMT2D", "CREBBP", "EP300", "ARID2", "RBM10", "U2AF1", "ZNF217", "GATA6",
    "FOXA1", "HNF1B", "SOX9", "IRS2", "ERBB4", "FGFR2", "FGFR3", "TERC", "GPC5", "RICTOR",
)

#: Mutated genes and their per-patient rate of a protein-changing mutation (LUAD-like, TCGA-style).
MUTATION_RATES: dict[str, float] = {
    "TP53": 0.46, "TTN": 0.45, "KRAS": 0.32, "KEAP1": 0.19, "STK11": 0.17, "EGFR": 0.14,
    "KMT2C": 0.10, "NF1": 0.11, "ATM": 0.08, "RBM10": 0.08, "KMT2D": 0.08, "BRAF": 0.07,
    "SMARCA4": 0.07, "PIK3CA": 0.06, "ARID1A": 0.07, "SETD2": 0.07, "APC": 0.05, "BRCA2": 0.05,
    "MET": 0.04, "RB1": 0.04, "CDKN2A": 0.04, "U2AF1": 0.03, "ERBB2": 0.03, "PTEN": 0.03,
    "CTNNB1": 0.03, "NOTCH1": 0.03, "NFE2L2": 0.03, "SMAD4": 0.03, "POLE": 0.03, "TSC2": 0.02,
}

#: Protein-changing variant classes and their shares; "Silent" rows are added separately.
VARIANT_CLASSES: dict[str, float] = {
    "Missense_Mutation": 0.70, "Nonsense_Mutation": 0.09, "Frame_Shift_Del": 0.07,
    "Frame_Shift_Ins": 0.04, "Splice_Site": 0.06, "In_Frame_Del": 0.03, "In_Frame_Ins": 0.01,
}
SILENT_RATE = 0.015  # per gene and patient

#: The planted omic signal: weights on standardised features (positive = shorter survival).
OMIC_SIGNAL: dict[str, dict[str, float]] = {
    "rna": {"MKI67": 0.45, "TOP2A": 0.35, "FOXM1": 0.35, "CD8A": -0.45, "NKX2-1": -0.4},
    "cnv": {"CDKN2A": -0.55},   # deletion (negative call) raises risk
    "mut": {"KEAP1": 0.6},      # a protein-changing KEAP1 mutation raises risk
}

# Latent programmes: member genes load strongly on their programme.
PROGRAMMES: dict[str, tuple[str, ...]] = {
    "proliferation": ("MKI67", "TOP2A", "PCNA", "MCM2", "MCM7", "CCNB1", "CCNE1", "CDC20", "AURKA",
                      "AURKB", "PLK1", "BUB1", "BIRC5", "E2F1", "FOXM1"),
    "immune": ("CD8A", "CD4", "CD3E", "FOXP3", "GZMB", "PRF1", "IFNG", "STAT1", "IRF1", "HLA-A", "B2M",
               "PTPRC", "CD274", "PDCD1", "CTLA4", "LAG3", "HAVCR2", "MS4A1", "CD19", "CD68", "CD163"),
    "stromal": ("COL1A1", "COL1A2", "COL3A1", "FN1", "SPARC", "POSTN", "ACTA2", "FAP", "PDGFRB", "THY1",
                "MMP2", "TIMP1", "LOX", "VIM", "TWIST1", "SNAI2", "ZEB1"),
    "nrf2": ("NQO1", "GCLM", "TXNRD1", "HMOX1", "G6PD", "SLC7A11", "AKR1C1", "ALDH3A1", "GPX2", "CYP24A1"),
    "alveolar": ("NKX2-1", "NAPSA", "SFTPC", "SFTPB", "SFTPA1", "SCGB1A1", "FOXA1", "HNF1B"),
}
PROGRAMME_LOADING = 0.7
KEAP1_NRF2_SHIFT = 1.2      # a KEAP1 mutation switches the NRF2 programme on (in sd units)
CNV_CIS_EFFECT = 0.35       # log-expression shift per copy-number call for genes in both tables
CNV_ARM_SD, CNV_GENE_SD = 0.6, 0.5
CNV_CUTS = (-2.0, -1.0, 1.0, 2.0)   # latent -> calls -2, -1, 0, 1, 2
CNV_BIAS = {"CDKN2A": -0.9, "CDKN2B": -0.8, "MTAP": -0.6, "FHIT": -0.4, "PTPRD": -0.4, "LRP1B": -0.3,
            "NKX2-1": 0.4, "MYC": 0.5, "TERT": 0.5, "EGFR": 0.3, "MDM2": 0.2, "CCNE1": 0.2}

# Survival model: Weibull baseline (shape, median days at risk 0) and censoring share.
WEIBULL_SHAPE = 1.3
MEDIAN_DAYS = 1500.0
CENSORED_SHARE = 0.55


@dataclass(frozen=True)
class OmicDraw:
    """Per-patient omic values for one cohort (rows follow the patient order given)."""

    rna_log: np.ndarray        # patients x len(RNA_GENES), natural-log expression (+1 offset removed later)
    rna_z: np.ndarray          # intrinsic standardised expression (before cis copy-number effects)
    cnv: np.ndarray            # patients x len(CNV_GENES), integer calls in {-2..2}
    mutations: list[list[tuple[str, str]]]  # per patient: (gene, variant class)
    omic_score: np.ndarray     # standardised planted omic score (unit variance by construction)


def _loadings(rng: np.random.Generator) -> np.ndarray:
    """Gene x programme loadings: strong for members, a little noise elsewhere."""
    names = list(PROGRAMMES)
    load = rng.normal(0.0, 0.08, (len(RNA_GENES), len(names)))
    index = {g: i for i, g in enumerate(RNA_GENES)}
    for k, name in enumerate(names):
        for gene in PROGRAMMES[name]:
            load[index[gene], :] = 0.0
            load[index[gene], k] = PROGRAMME_LOADING
    return load


def draw_omics(n: int, rng: np.random.Generator) -> OmicDraw:
    """Draw expression, copy number and mutations for ``n`` patients, plus the planted omic score."""
    n_genes = len(RNA_GENES)
    mu = rng.normal(6.0, 1.6, n_genes)
    sd = rng.uniform(0.4, 1.1, n_genes)
    load = _loadings(rng)
    unique = np.sqrt(np.clip(1.0 - (load**2).sum(1), 0.05, None))

    # Mutations first: KEAP1 status moves the NRF2 programme.
    mut_genes = list(MUTATION_RATES)
    rates = np.array([MUTATION_RATES[g] for g in mut_genes])
    mutated = rng.random((n, len(mut_genes))) < rates
    kras, egfr = mut_genes.index("KRAS"), mut_genes.index("EGFR")
    mutated[:, egfr] &= ~mutated[:, kras]          # KRAS and EGFR drivers are mutually exclusive
    classes = list(VARIANT_CLASSES)
    class_p = np.array(list(VARIANT_CLASSES.values()))
    class_p = class_p / class_p.sum()
    chosen = rng.choice(len(classes), size=mutated.shape, p=class_p)
    silent = rng.random(mutated.shape) < SILENT_RATE
    mutations: list[list[tuple[str, str]]] = []
    for i in range(n):
        rows = [(mut_genes[j], classes[chosen[i, j]]) for j in np.flatnonzero(mutated[i])]
        rows += [(mut_genes[j], "Silent") for j in np.flatnonzero(silent[i])]
        if not rows:  # every sequenced tumour has at least one call in the table
            rows.append(("TTN", "Silent"))
        mutations.append(rows)

    factors = rng.standard_normal((n, load.shape[1]))
    nrf2 = list(PROGRAMMES).index("nrf2")
    keap1 = mut_genes.index("KEAP1")
    factors[:, nrf2] += KEAP1_NRF2_SHIFT * (mutated[:, keap1] - rates[keap1])
    rna_z = factors @ load.T + rng.standard_normal((n, n_genes)) * unique

    # Copy number: each gene sits on one of 12 "arms" that gain or lose together.
    n_cnv = len(CNV_GENES)
    arm = rng.integers(0, 12, n_cnv)
    arm_events = rng.normal(0.0, CNV_ARM_SD, (n, 12))
    bias = np.array([CNV_BIAS.get(g, 0.0) for g in CNV_GENES])
    latent = arm_events[:, arm] + rng.normal(0.0, CNV_GENE_SD, (n, n_cnv)) + bias
    cnv = np.digitize(latent, CNV_CUTS) - 2

    rna_log = mu + sd * rna_z
    cnv_index = {g: j for j, g in enumerate(CNV_GENES)}
    for g_idx, gene in enumerate(RNA_GENES):
        if gene in cnv_index and gene not in OMIC_SIGNAL["rna"]:
            rna_log[:, g_idx] += CNV_CIS_EFFECT * cnv[:, cnv_index[gene]]

    score, var = np.zeros(n), 0.0
    rna_index = {g: i for i, g in enumerate(RNA_GENES)}
    w = np.zeros(n_genes)
    for gene, weight in OMIC_SIGNAL["rna"].items():
        w[rna_index[gene]] = weight
    cov = load @ load.T + np.diag(unique**2)
    score += rna_z @ w
    var += float(w @ cov @ w)
    for gene, weight in OMIC_SIGNAL["cnv"].items():
        calls = cnv[:, cnv_index[gene]]
        score += weight * calls
        var += weight**2 * _cnv_call_variance(bias[cnv_index[gene]])
    for gene, weight in OMIC_SIGNAL["mut"].items():
        p = rates[mut_genes.index(gene)]
        score += weight * (mutated[:, mut_genes.index(gene)] - p)
        var += weight**2 * p * (1 - p)
    return OmicDraw(rna_log=rna_log, rna_z=rna_z, cnv=cnv, mutations=mutations,
                    omic_score=score / np.sqrt(var))


def _cnv_call_variance(bias: float) -> float:
    """Variance of one gene's call under the model above (latent ~ N(bias, arm sd^2 + gene sd^2))."""
    s = float(np.hypot(CNV_ARM_SD, CNV_GENE_SD))
    cuts = np.array([0.5 * (1 + math.erf((c - bias) / (s * math.sqrt(2)))) for c in CNV_CUTS])
    probs = np.diff(np.concatenate([[0.0], cuts, [1.0]]))
    values = np.array([-2, -1, 0, 1, 2])
    mean = float(probs @ values)
    return float(probs @ values**2 - mean**2)


def survival_times(risk: np.ndarray, rng: np.random.Generator,
                   censored_share: float = CENSORED_SHARE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportional-hazards survival: returns (observed days, event 0/1, uncensored event days).

    Event times are Weibull with log hazard ratio ``risk``; censoring times are a shared follow-up
    scale times a per-patient uniform factor, the scale set so that exactly
    ``round(censored_share * n)`` patients are censored (independent of each patient's risk).
    """
    n = len(risk)
    scale = MEDIAN_DAYS / np.log(2.0) ** (1.0 / WEIBULL_SHAPE)
    u = rng.random(n)
    event_days = scale * (-np.log(u)) ** (1.0 / WEIBULL_SHAPE) * np.exp(-risk / WEIBULL_SHAPE)
    follow = rng.uniform(0.1, 1.0, n)
    ratio = np.sort(event_days / follow)
    n_censored = int(round(censored_share * n))
    # Patient censored iff follow-up scale s < event_days / follow: put s between two sorted ratios.
    k = n - n_censored
    lo = ratio[k - 1] if k > 0 else 0.0
    hi = ratio[k] if k < n else ratio[-1] * 2
    s = 0.5 * (lo + hi)
    censor_days = s * follow
    event = (event_days <= censor_days).astype(int)
    observed = np.minimum(event_days, censor_days)
    return np.maximum(1, np.ceil(observed)).astype(int), event, event_days
