"""The GMC paper's reported results (Tables 1-4), written into the headers of the generated configs."""

from __future__ import annotations

__all__ = ["PAPER", "TABLE3_COEFFS", "TABLE3_RESULTS", "TABLE4_RESULTS"]

# Paper results (the GMC paper's Tables 1-4), accuracy / RCC, keyed by (table, dataset, model, method).
PAPER: dict[tuple[str, str, str, str], str] = {}
_T1 = {
    ("cifar10", "resnet20"): [
        "92.44% / 0.66%",
        "92.30% / 0.66%",
        "91.70% / 0.62%",
        "92.29% / 0.65%",
        "92.30% / 0.64%",
    ],
    ("cifar10", "vit"): [
        "83.67% / 0.82%",
        "83.35% / 0.81%",
        "76.81% / 0.62%",
        "82.67% / 0.81%",
        "83.46% / 0.80%",
    ],
    ("cifar100", "resnet20"): [
        "68.05% / 0.64%",
        "68.66% / 0.64%",
        "66.62% / 0.65%",
        "68.72% / 0.64%",
        "68.89% / 0.64%",
    ],
    ("cifar100", "vit"): [
        "59.28% / 0.80%",
        "59.15% / 0.79%",
        "50.35% / 0.65%",
        "56.56% / 0.79%",
        "59.28% / 0.78%",
    ],
}
_T2 = {
    ("cifar10", "resnet20"): [
        "67.13% / 0.65%",
        "81.93% / 0.65%",
        "78.65% / 0.63%",
        "82.15% / 0.65%",
        "86.51% / 0.64%",
    ],
    ("cifar10", "vit"): [
        "60.24% / 0.81%",
        "71.35% / 0.81%",
        "67.35% / 0.67%",
        "72.25% / 0.81%",
        "73.34% / 0.81%",
    ],
    ("cifar100", "resnet20"): [
        "50.02% / 0.64%",
        "52.79% / 0.64%",
        "50.17% / 0.65%",
        "52.07% / 0.64%",
        "58.59% / 0.63%",
    ],
    ("cifar100", "vit"): [
        "53.29% / 0.79%",
        "55.00% / 0.80%",
        "45.91% / 0.70%",
        "50.74% / 0.79%",
        "57.77% / 0.79%",
    ],
}
for _table, _src in (("table1", _T1), ("table2", _T2)):
    for (_ds, _model), _vals in _src.items():
        for _m, _v in zip(("dgc_mfm", "dgc", "cser", "def_a", "gmc"), _vals, strict=True):
            PAPER[(_table, _ds, _model, _m)] = _v
TABLE3_RESULTS = {
    "def_a": ["4.09 / 6.03%", "0.56 / 66.36%", "0.57 / 65.28%", "0.68 / 64.84%", "0.76 / 64.45%"],
    "gmc_plus": ["3.48 / 15.81%", "0.55 / 67.31%", "0.40 / 67.94%", "0.42 / 67.27%", "0.43 / 66.68%"],
}
TABLE3_COEFFS = (0.0, 0.3, 0.5, 0.8, 1.0)
TABLE4_RESULTS = {
    ("cifar10", "iid", "resnet20"): ("90.78%", "91.41%"),
    ("cifar10", "iid", "vit"): ("74.21%", "75.78%"),
    ("cifar10", "noniid", "resnet20"): ("78.17%", "79.25%"),
    ("cifar10", "noniid", "vit"): ("65.16%", "66.61%"),
    ("cifar100", "iid", "resnet20"): ("66.36%", "67.94%"),
    ("cifar100", "iid", "vit"): ("50.85%", "55.50%"),
    ("cifar100", "noniid", "resnet20"): ("49.39%", "51.22%"),
    ("cifar100", "noniid", "vit"): ("46.09%", "50.07%"),
}
