"""Initialisations read off the kernel (PiSSA, OLoRA) or the data (EVA), and the export back to plain LoRA."""

from lorajax.inits._eva import eva_init, pca, rank_distribution
from lorajax.inits._export import plain_lora, plain_node, residual_problems, to_plain_lora
from lorajax.inits._factors import (
    as_matrix,
    check_init,
    init_factors,
    is_residual,
    randomized_svd,
    residual_base,
)

__all__ = [
    "as_matrix",
    "check_init",
    "eva_init",
    "init_factors",
    "is_residual",
    "pca",
    "plain_lora",
    "plain_node",
    "randomized_svd",
    "rank_distribution",
    "residual_base",
    "residual_problems",
    "to_plain_lora",
]
