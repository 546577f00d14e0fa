"""Scaling laws: Chinchilla fits L(N, D) = E + A/N^alpha + B/D^beta, bootstrap intervals, cross-validation,
compute-optimal allocation, token-savings factors, and their plots.

scipy is needed for fitting: pip install 'hybridlm[scaling]'.
"""

from hybridlm.scaling.fit import (
    ArchitectureAnalysis,
    BootstrapFits,
    ChinchillaFit,
    ComputeOptimal,
    HeldOutError,
    SavingsPoint,
    ScalingData,
    analyse,
    bootstrap_fit,
    default_compute_budgets,
    default_savings_sizes,
    default_target_losses,
    fit_chinchilla,
    leave_one_size_out,
    load_results_csv,
    percentile_interval,
    report_json,
    rollout_error,
    savings_point,
    savings_table,
    token_savings,
)

__all__ = [
    "ArchitectureAnalysis",
    "BootstrapFits",
    "ChinchillaFit",
    "ComputeOptimal",
    "HeldOutError",
    "SavingsPoint",
    "ScalingData",
    "analyse",
    "bootstrap_fit",
    "default_compute_budgets",
    "default_savings_sizes",
    "default_target_losses",
    "fit_chinchilla",
    "leave_one_size_out",
    "load_results_csv",
    "percentile_interval",
    "report_json",
    "rollout_error",
    "savings_point",
    "savings_table",
    "token_savings",
]
