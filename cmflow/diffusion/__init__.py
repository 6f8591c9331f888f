"""Consistency-model and EDM math: noise levels, solvers, samplers, losses, EMA, RNG and editing.

Imports only torch, numpy, scipy and the standard library (no orchestration packages).
"""

from cmflow.diffusion.editing import (
    colorization_basis,
    colorize,
    denoise,
    edit,
    inpaint,
    patch_basis,
    slerp,
    super_resolve,
)
from cmflow.diffusion.ema import ema_rate_from_halflife, ema_update, ema_warmup_rate
from cmflow.diffusion.losses import CDLoss, CTLoss, EDMLoss, ICTLoss, default_huber_c, distance
from cmflow.diffusion.noise_levels import (
    ct_ema_rate,
    ct_num_steps,
    ict_index_probs,
    ict_num_steps,
    karras_sigmas,
    sample_lognormal_indices,
    sample_uniform_indices,
)
from cmflow.diffusion.rng import (
    StackedRandomGenerator,
    call_with_shared_rng,
    randn,
    randn_like,
    seed_batches,
)
from cmflow.diffusion.samplers import cm_sample, cm_sigmas_from_indices, edm_sampler, ternary_search_midpoint
from cmflow.diffusion.solvers import euler_step, heun_step

__all__ = [
    "CDLoss",
    "CTLoss",
    "EDMLoss",
    "ICTLoss",
    "StackedRandomGenerator",
    "call_with_shared_rng",
    "cm_sample",
    "cm_sigmas_from_indices",
    "colorization_basis",
    "colorize",
    "ct_ema_rate",
    "ct_num_steps",
    "default_huber_c",
    "denoise",
    "distance",
    "edit",
    "edm_sampler",
    "ema_rate_from_halflife",
    "ema_update",
    "ema_warmup_rate",
    "euler_step",
    "heun_step",
    "ict_index_probs",
    "ict_num_steps",
    "inpaint",
    "karras_sigmas",
    "patch_basis",
    "randn",
    "randn_like",
    "sample_lognormal_indices",
    "sample_uniform_indices",
    "seed_batches",
    "slerp",
    "super_resolve",
    "ternary_search_midpoint",
]
