"""Write the LightningCLI configs of the GMC paper's Tables 1-4 and the offline digits runs.

The YAML files under ``examples/configs/`` are generated so that the ~70 of them stay consistent, but
each one is self-contained and spells out every value: edit a file directly to try something, or edit
this script and rerun it (``python examples/configs/generate.py``; ``--check`` reports files that differ
from what it would write, which the tests run).

Values and where they come from (the GMC paper's Section 5 unless stated; the inferred ones are
discussed in ``docs/algorithms.md``, "Paper experiments"):

* K = 8 ranks, total batch 128 (16 per rank), 200 epochs, cosine per epoch, no warm-up, SGD momentum
  0.9, weight decay 1e-4; lr 0.1 for ResNet-20 (the DGC CIFAR recipe per 128 samples), 0.05 for the ViT
  (the paper's value did not survive in the text we have).
* IID = random equal split with BatchNorm ResNet-20; non-IID = Dirichlet(0.1) (Lin et al.) with
  GroupNorm ResNet-20 (2 groups). The ViT is the same in both.
* Top-k runs (Tables 1-2): the paper's approximate top-k at density 0.25 % (inferred from the reported
  RCC of 0.64 % with K = 8 through the paper's eq. (9); calibrate against the measured ``gmc/rcc``).
* RBGS runs (Tables 3-4): density 1/64 (the DEF reference scripts' ratio 64; the paper's value is
  blank). DEF-A coefficient 0.3, GMC+ coefficient 0.5; Table 3 sweeps {0, 0.3, 0.5, 0.8, 1.0}.
* RBGS non-IID study (``rbgs_noniid/``, not a table of the paper): CIFAR-10, Dirichlet(0.1), ResNet-20
  (GN) and the ViT, RBGS at density 1/64 for every arm (equal RCC): GMC+ for lambda in {0, 0.3, 0.5,
  1.0}, DEF-A for c in {0, 0.3, 0.5}, and GMC+ with momentum on the aggregate
  (``ef_server_momentum`` with ``detach``) for lambda in {0, 0.3, 0.5, 1.0}; the GPU-sized counterpart
  of ``examples/noniid_study.py --suite rbgs``.
* AdamW (``adamw/``, not in the paper): the ViT on CIFAR-10 (IID) with ``AdamW(lr 1e-3, weight decay
  0.05)``, cosine per epoch, trained with ``method="ef"`` (error feedback on the gradient, AdamW left in
  charge; ``docs/algorithms.md`` 2.10) and top-k at the top-k tables' density, next to plain DDP with
  the same AdamW. Common ViT-on-CIFAR AdamW values, not tuned here.
* DGC: no warm-up (the GMC paper disables it); w/ and w/o momentum factor masking.
* CSER: C1 density 0.1 %, C2 (top-k) density 0.8 % every H = 8 steps (Xie et al.'s pattern rho2 / H = rho1;
  the paper's values did not survive in the text we have).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent

TOPK_DENSITY = 0.0025
RBGS_DENSITY = 0.015625


@dataclass(frozen=True)
class Method:
    """One method column: the strategy's ``init_args`` (or a plain DDP baseline)."""

    key: str
    title: str
    init_args: dict[str, object] = field(default_factory=dict)
    ddp: bool = False


def topk_methods(
    density: float, cser_density: float = 0.001, cser_reset_density: float = 0.008
) -> list[Method]:
    """The five columns of Tables 1 and 2 (``density``: top-k density of DGC, DEF-A and GMC)."""
    common = {"compressor": "topk_approx", "density": density}
    # DGC as the GMC paper ran it: no sparsity warm-up, no clipping, weight decay inside the compressed
    # vector like every other method here (the DGC code's local variant is weight_decay_mode: local).
    dgc = {"sparsity_warmup": False, "clip_norm": None, "weight_decay_mode": "compressed"}
    return [
        Method(
            "dgc_mfm",
            "DGC (w/ mfm)",
            {"method": "dgc", **common, "method_options": {"momentum_masking": True, **dgc}},
        ),
        Method(
            "dgc",
            "DGC (w/o mfm)",
            {"method": "dgc", **common, "method_options": {"momentum_masking": False, **dgc}},
        ),
        Method(
            "cser",
            "CSER",
            {
                "method": "cser",
                "compressor": "topk_approx",
                "density": cser_density,
                "method_options": {
                    "reset_compressor": "topk_approx",
                    "reset_density": cser_reset_density,
                    "reset_interval": 8,
                },
            },
        ),
        Method(
            "def_a",
            "DEF-A",
            {
                "method": "def_a",
                **common,
                "detach": 0.3,
                "method_options": {"evaluation": "x_t_minus_mean_error"},
            },
        ),
        Method(
            "gmc",
            "GMC",
            {"method": "gmc", **common, "detach": 0.0, "method_options": {"momentum_lr_convention": "prev"}},
        ),
    ]


RBGS_STUDY_ARMS = (
    ("gmc_plus", (0.0, 0.3, 0.5, 1.0)),
    ("def_a", (0.0, 0.3, 0.5)),
    ("gmc_plus_agg_momentum", (0.0, 0.3, 0.5, 1.0)),
)


def rbgs_method(key: str, coeff: float) -> Method:
    """A Table 3 / Table 4 column (DEF-A or GMC+), or the aggregate-momentum variant, with RBGS and
    detach coefficient ``coeff``."""
    name = {"def_a": "def_a", "gmc_plus": "gmc", "gmc_plus_agg_momentum": "ef_server_momentum"}[key]
    title = {
        "def_a": "DEF-A",
        "gmc_plus": "GMC+",
        "gmc_plus_agg_momentum": "GMC+ with momentum on the aggregate",
    }[key]
    return Method(
        key,
        f"{title} (coefficient {coeff})",
        {"method": name, "compressor": "rbgs", "density": RBGS_DENSITY, "detach": coeff},
    )


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
_T3 = {
    "def_a": ["4.09 / 6.03%", "0.56 / 66.36%", "0.57 / 65.28%", "0.68 / 64.84%", "0.76 / 64.45%"],
    "gmc_plus": ["3.48 / 15.81%", "0.55 / 67.31%", "0.40 / 67.94%", "0.42 / 67.27%", "0.43 / 66.68%"],
}
TABLE3_COEFFS = (0.0, 0.3, 0.5, 0.8, 1.0)
_T4 = {
    ("cifar10", "iid", "resnet20"): ("90.78%", "91.41%"),
    ("cifar10", "iid", "vit"): ("74.21%", "75.78%"),
    ("cifar10", "noniid", "resnet20"): ("78.17%", "79.25%"),
    ("cifar10", "noniid", "vit"): ("65.16%", "66.61%"),
    ("cifar100", "iid", "resnet20"): ("66.36%", "67.94%"),
    ("cifar100", "iid", "vit"): ("50.85%", "55.50%"),
    ("cifar100", "noniid", "resnet20"): ("49.39%", "51.22%"),
    ("cifar100", "noniid", "vit"): ("46.09%", "50.07%"),
}


def _yaml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def _block(d: dict[str, object], indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{pad}{k}:")
            out += _block(v, indent + 2)
        else:
            out.append(f"{pad}{k}: {_yaml_value(v)}")
    return out


def model_block(model: str, classes: int, norm: str) -> list[str]:
    """The ``model:`` section (ClassificationModule + network)."""
    if model == "resnet20":
        net = ["    class_path: examples.models.ResNet20", "    init_args:"]
        net += _block({"num_classes": classes, "norm": norm, "gn_groups": 2, "shortcut": "conv"}, 6)
        lr = 0.1
    elif model == "vit":
        net = [
            "    class_path: examples.models.ViT  # Lee et al. (2021), 4 blocks as in the GMC paper",
            "    init_args:",
        ]
        net += _block(
            {
                "num_classes": classes,
                "image_size": 32,
                "patch_size": 4,
                "dim": 192,
                "depth": 4,
                "heads": 12,
                "dim_head": 16,
                "mlp_ratio": 2,
                "dropout": 0.0,
                "emb_dropout": 0.0,
            },
            6,
        )
        lr = 0.05
    else:
        raise ValueError(model)
    return [
        "model:",
        "  model:",
        *net,
        f"  lr: {lr}",
        "  momentum: 0.9",
        "  weight_decay: 0.0001",
        "  max_epochs: 200  # cosine period in epochs (stepped once per epoch)",
        "  num_classes: null  # null: read from the network",
    ]


ADAMW_LR = 0.001
ADAMW_WEIGHT_DECAY = 0.05


def adamw_model_block(model: str, classes: int, norm: str) -> list[str]:
    """:func:`model_block` with ``AdamW`` as the optimizer instead of SGD."""
    out: list[str] = []
    for line in model_block(model, classes, norm):
        if line.startswith("  lr: "):
            out.append(f"  lr: {ADAMW_LR}")
        elif line.startswith("  momentum: "):
            out.append("  momentum: 0.9  # SGD only; AdamW uses betas")
        elif line.startswith("  weight_decay: "):
            out += [
                f"  weight_decay: {ADAMW_WEIGHT_DECAY}  # AdamW's decoupled decay",
                "  optimizer: adamw",
                "  betas: [0.9, 0.999]",
            ]
        else:
            out.append(line)
    return out


def cifar_data_block(dataset: str, partition: str) -> list[str]:
    """The ``data:`` section for CIFAR."""
    return [
        "data:",
        "  class_path: examples.data.CIFARDataModule",
        "  init_args:",
        f"    name: {dataset}",
        "    data_dir: ./data",
        "    download: true  # fetched once, before the ranks start; offline: --data.synthetic=true",
        "    synthetic: false  # true: generated data of the same shape (tests, offline smoke runs)",
        "    augment: true  # random crop 32 (padding 4) + horizontal flip",
        "    batch_size: 16  # per rank: 8 ranks x 16 = 128 in total, as in the paper",
        "    eval_batch_size: 256",
        "    num_workers: 4",
        f"    partition: {partition}  # iid: random equal split; dirichlet: Lin et al. (2021)",
        "    alpha: 0.1  # Dirichlet concentration (used when partition: dirichlet)",
        "    seed: 0  # partition seed, identical on every rank",
        "    drop_remainder: true",
        "    drop_last: false",
    ]


def trainer_block(
    run_name: str,
    strategy: list[str],
    devices: int = 8,
    accelerator: str = "auto",
    max_epochs: int = 200,
    log_every: int = 50,
) -> list[str]:
    """The ``trainer:`` section."""
    return [
        "trainer:",
        f"  accelerator: {accelerator}",
        f"  devices: {devices}" + ("  # K = 8 workers, as in the paper" if devices == 8 else ""),
        "  num_nodes: 1",
        f"  max_epochs: {max_epochs}",
        "  precision: 32-true",
        "  use_distributed_sampler: false  # the DataModule partitions the data across ranks itself",
        f"  log_every_n_steps: {log_every}",
        "  logger:",
        "    class_path: lightning.pytorch.loggers.CSVLogger",
        "    init_args:",
        "      save_dir: lightning_logs",
        f"      name: {run_name}",
        "  callbacks:",
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor",
        "      init_args:",
        "        logging_interval: epoch",
        *strategy,
    ]


def strategy_block(method: Method, note: str = "") -> list[str]:
    """The ``trainer.strategy`` section."""
    if method.ddp:
        return [
            "  strategy:  # plain DDP: dense all-reduce of every gradient (the uncompressed baseline)",
            "    class_path: lightning.pytorch.strategies.DDPStrategy",
            "    init_args:",
            "      process_group_backend: gloo",
        ]
    args = dict(method.init_args)
    args.setdefault("seed", 0)
    if args.get("method") != "ef":  # ef leaves momentum to the optimizer and refuses an override
        args.setdefault("momentum", None)
    lines = [
        f"  strategy:  # {method.title}{note}",
        "    class_path: lightning_gmc.GMCStrategy",
        "    init_args:",
    ]
    for k, v in args.items():
        comment = ""
        if k == "momentum":
            comment = "  # null: use the optimizer's momentum (model.momentum)"
        elif k == "seed":
            comment = "  # shared random streams (RBGS blocks); equal on every rank"
        if isinstance(v, dict):
            lines.append(f"      {k}:")
            lines += _block(v, 8)
        else:
            lines.append(f"      {k}: {_yaml_value(v)}{comment}")
    return lines


def render(header: list[str], trainer: list[str], model: list[str], data: list[str]) -> str:
    """Join the sections into one YAML document."""
    return (
        "\n".join([*(f"# {h}" if h else "#" for h in header), "seed_everything: 0", *trainer, *model, *data])
        + "\n"
    )


def all_configs() -> dict[str, str]:
    """Relative path -> YAML text for every config."""
    out: dict[str, str] = {}
    norm_of = {"iid": "bn", "noniid": "gn"}
    model_title = {
        "resnet20": {"bn": "ResNet-20 (BN)", "gn": "ResNet-20 (GN)"},
        "vit": {"bn": "ViT", "gn": "ViT"},
    }

    def cifar(rel: str, title: str, paper: str, dataset: str, dist: str, model: str, method: Method) -> None:
        norm = norm_of[dist]
        classes = 10 if dataset == "cifar10" else 100
        run = rel.removesuffix(".yaml")
        header = [
            title,
            f"{dataset.upper()}, {'IID' if dist == 'iid' else 'non-IID Dirichlet(0.1)'}, "
            f"{model_title[model][norm]}, {method.title}.",
            f"Paper: {paper}",
            f"Run: python examples/train.py fit --config examples/configs/{rel}",
            "Laptop smoke run (no data, 2 CPU processes): add --data.synthetic=true "
            "--trainer.accelerator=cpu --trainer.devices=2",
            "Generated by examples/configs/generate.py.",
        ]
        out[rel] = render(
            header,
            trainer_block(run, strategy_block(method)),
            model_block(model, classes, norm),
            cifar_data_block(dataset, "iid" if dist == "iid" else "dirichlet"),
        )

    for table, dist, title in (
        ("table1", "iid", "Table 1 (IID, top-k): accuracy / RCC"),
        ("table2", "noniid", "Table 2 (non-IID, Dirichlet 0.1, top-k): accuracy / RCC"),
    ):
        for dataset in ("cifar10", "cifar100"):
            for model in ("resnet20", "vit"):
                for method in topk_methods(TOPK_DENSITY):
                    tag = f"{model}{norm_of[dist]}" if model == "resnet20" else model
                    rel = f"{table}/{dataset}_{dist}_{tag}_{method.key}.yaml"
                    cifar(
                        rel, title, PAPER[(table, dataset, model, method.key)], dataset, dist, model, method
                    )

    for key in ("def_a", "gmc_plus"):
        for coeff, paper in zip(TABLE3_COEFFS, _T3[key], strict=True):
            rel = f"table3/cifar100_iid_resnet20bn_{key}_coeff{coeff}.yaml"
            title = "Table 3 (RBGS, coefficient sweep, ResNet-20 / CIFAR-100): training loss / test accuracy"
            cifar(rel, title, paper, "cifar100", "iid", "resnet20", rbgs_method(key, coeff))

    for (dataset, dist, model), (def_a, gmc_plus) in _T4.items():
        tag = f"{model}{norm_of[dist]}" if model == "resnet20" else model
        for key, coeff, paper in (("def_a", 0.3, def_a), ("gmc_plus", 0.5, gmc_plus)):
            rel = f"table4/{dataset}_{dist}_{tag}_{key}.yaml"
            title = "Table 4 (RBGS, DEF-A c=0.3 vs GMC+ lambda=0.5): test accuracy"
            cifar(rel, title, paper, dataset, dist, model, rbgs_method(key, coeff))

    for model in ("resnet20", "vit"):
        tag = "resnet20gn" if model == "resnet20" else model
        table4 = _T4[("cifar10", "noniid", model)]
        for key, coeffs in RBGS_STUDY_ARMS:
            for coeff in coeffs:
                rel = f"rbgs_noniid/cifar10_noniid_{tag}_{key}_coeff{coeff}.yaml"
                title = "RBGS non-IID study (equal RCC; docs/algorithms.md 2.9)"
                paper = {("def_a", 0.3): f"Table 4, {table4[0]}", ("gmc_plus", 0.5): f"Table 4, {table4[1]}"}
                absent = "not in the paper" if key == "gmc_plus_agg_momentum" else "not reported"
                result = paper.get((key, coeff), absent)
                cifar(rel, title, result, "cifar10", "noniid", model, rbgs_method(key, coeff))

    # AdamW with error feedback on the gradient (method="ef"), and plain DDP with the same AdamW.
    for method in (
        Method("ddp_adamw", "plain DDP + AdamW", ddp=True),
        Method(
            "ef_adamw",
            "EF (error feedback on the gradient) + AdamW, top-k",
            {"method": "ef", "compressor": "topk_approx", "density": TOPK_DENSITY},
        ),
    ):
        rel = f"adamw/cifar10_iid_vit_{method.key}.yaml"
        header = [
            "AdamW with compressed communication (not in the paper; docs/algorithms.md 2.10)",
            f"CIFAR10, IID, ViT, {method.title}.",
            f"Run: python examples/train.py fit --config examples/configs/{rel}",
            "Laptop smoke run (no data, 2 CPU processes): add --data.synthetic=true "
            "--trainer.accelerator=cpu --trainer.devices=2",
            "Generated by examples/configs/generate.py.",
        ]
        out[rel] = render(
            header,
            trainer_block(rel.removesuffix(".yaml"), strategy_block(method)),
            adamw_model_block("vit", 10, "bn"),
            cifar_data_block("cifar10", "iid"),
        )

    # Offline digits runs: 2 CPU processes (gloo), scikit-learn's bundled digits, small CNN.
    digits_methods = [
        Method("ddp", "plain DDP", ddp=True),
        # CSER's two compressors scaled like the CIFAR runs (C1 = density / 2.5, C2 = 8 * C1 every 8 steps).
        *topk_methods(0.01, cser_density=0.004, cser_reset_density=0.032),
        Method(
            "gmc_plus",
            "GMC+ (RBGS, coefficient 0.5)",
            {"method": "gmc", "compressor": "rbgs", "density": 0.01, "detach": 0.5},
        ),
    ]
    for dist in ("iid", "noniid"):
        for method in digits_methods:
            rel = f"digits/{method.key}_{dist}.yaml"
            header = [
                f"Offline digits ({'IID' if dist == 'iid' else 'non-IID Dirichlet(0.1)'}), {method.title}: "
                "2 CPU processes (gloo), no download.",
                f"Run: python examples/train.py fit --config examples/configs/{rel}",
                "Generated by examples/configs/generate.py.",
            ]
            model = [
                "model:",
                "  model:",
                "    class_path: examples.models.DigitsCNN",
                "    init_args:",
                "      num_classes: 10",
                "      width: 16",
                "      in_channels: 1",
                "  lr: 0.1",
                "  momentum: 0.9",
                "  weight_decay: 0.0001",
                "  max_epochs: 20  # cosine period in epochs (stepped once per epoch)",
                "  num_classes: null  # null: read from the network",
            ]
            data = [
                "data:",
                "  class_path: examples.data.DigitsDataModule",
                "  init_args:",
                "    train_size: 1440  # stratified split of the 1797 images; the other 357 are the test set",
                "    split_seed: 0",
                "    batch_size: 16  # per rank",
                "    eval_batch_size: 512",
                "    num_workers: 0",
                f"    partition: {'iid' if dist == 'iid' else 'dirichlet'}",
                "    alpha: 0.1",
                "    seed: 0",
                "    drop_remainder: true",
                "    drop_last: false",
            ]
            trainer = trainer_block(
                rel.removesuffix(".yaml"),
                strategy_block(method),
                devices=2,
                accelerator="cpu",
                max_epochs=20,
                log_every=10,
            )
            out[rel] = render(header, trainer, model, data)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the configs (or, with ``--check``, list the ones that differ and return 1)."""
    parser = argparse.ArgumentParser(description="Generate examples/configs/**/*.yaml")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    configs = all_configs()
    stale = []
    for rel, text in configs.items():
        path = CONFIG_DIR / rel
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        for rel in stale:
            print(f"stale: {rel}")
        return 1 if stale else 0
    print(f"wrote {len(configs)} configs under {CONFIG_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
