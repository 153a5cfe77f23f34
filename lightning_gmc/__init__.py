"""lightning-gmc: communication-compressed data-parallel training for PyTorch Lightning.

``Trainer(strategy=GMCStrategy(compressor="topk_approx", density=0.01))`` replaces DDP's dense
gradient all-reduce with compression, error feedback and global momentum (GMC; GMC+ when
``detach > 0``, e.g. ``GMCStrategy(compressor="rbgs", detach=0.5)``).
Importing this package registers the strategy names (``"gmc"``, ``"gmc_plus"``, one per method) for
the Trainer and for Fabric (:class:`GMCFabricStrategy`).

Layers (each imports only those below it): ``compressors`` -> ``methods`` -> ``transport`` ->
``hook`` / ``simulator`` -> ``strategy``; ``config`` (one validated :class:`GMCConfig`) builds
the method for the hook, the simulator and the strategy (``docs/architecture.md``). ``cli`` is the
``lightning-gmc`` command.
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_gmc.compressors import COMPRESSORS, Compressor, build_compressor, register_compressor
from lightning_gmc.config import GMCConfig
from lightning_gmc.fabric import GMCFabricStrategy
from lightning_gmc.hierarchical_simulator import HierarchicalSimulator
from lightning_gmc.hook import GMCHookState, gmc_hook
from lightning_gmc.methods import METHODS, Method, build_method, register_method
from lightning_gmc.simulator import Simulator
from lightning_gmc.strategy import GMCStrategy

__version__ = "0.1.0"

GMCStrategy.register_strategies(StrategyRegistry)
GMCFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)

__all__ = [
    "COMPRESSORS",
    "METHODS",
    "Compressor",
    "GMCConfig",
    "GMCFabricStrategy",
    "GMCHookState",
    "GMCStrategy",
    "HierarchicalSimulator",
    "Method",
    "Simulator",
    "build_compressor",
    "build_method",
    "gmc_hook",
    "register_compressor",
    "register_method",
]
