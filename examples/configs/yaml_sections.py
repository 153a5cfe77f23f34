"""The sections of one generated LightningCLI config (``trainer:``, ``model:``, ``data:``) as YAML lines."""

from __future__ import annotations

from examples.configs.method_columns import Method

__all__ = [
    "ADAMW_LR",
    "ADAMW_WEIGHT_DECAY",
    "adamw_model_block",
    "cifar_data_block",
    "model_block",
    "render",
    "strategy_block",
    "trainer_block",
]


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
        "  max_epochs: null  # cosine period (epochs, stepped per epoch); null: trainer.max_epochs",
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
