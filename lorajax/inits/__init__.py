"""Initialisations read off the kernel (PiSSA, OLoRA, LoftQ) or the data (EVA), and the export back to plain LoRA."""

from lorajax.inits._eva import eva_init, pca, rank_distribution
from lorajax.inits._export import plain_lora, plain_node, residual_problems, to_plain_lora, weight_conversion
from lorajax.inits._factors import (
    check_init,
    init_factors,
    init_problem,
    is_residual,
    randomized_svd,
    residual_base,
)
from lorajax.inits._matrix import as_matrix

__all__ = [
    "as_matrix",
    "check_init",
    "eva_init",
    "init_factors",
    "init_problem",
    "is_residual",
    "pca",
    "plain_lora",
    "plain_node",
    "randomized_svd",
    "rank_distribution",
    "residual_base",
    "residual_problems",
    "to_plain_lora",
    "weight_conversion",
]
