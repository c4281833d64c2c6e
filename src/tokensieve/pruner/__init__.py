"""The trained two-stage pruner as an inference object (load, attach, save), and its settings."""

from tokensieve.pruner.settings import PrunerSettings
from tokensieve.pruner.two_stage import TwoStagePruner, backbone_signature

__all__ = ["PrunerSettings", "TwoStagePruner", "backbone_signature"]
