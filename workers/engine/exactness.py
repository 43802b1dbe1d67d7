"""The preflight's check that kvorch reproduces the model: the baseline (nothing evicted) through
kvorch's chunked, masked attention must give the NLL of one plain full-sequence forward of the
same model under transformers' own eager attention.

This is what "exact" means in the support matrix (tests/families.py), checked on the user's real
model before the sweep, so a family whose attention does something kvorch does not know (a bias
in the mask, a layer outside the attention interface) is refused at submit time instead of
giving wrong numbers. The tolerance allows only floating-point reordering: chunking and masking
change the order of sums, nothing else.
"""

from __future__ import annotations

import torch

from workers.contract.configs import EvalConfig
from workers.engine.core import Engine
from workers.engine.nll import token_nll
from workers.modeling.attention import ATTENTION_NAME
from workers.presses.baseline import BaselinePress

# Relative NLL error allowed per dtype: float32 reorders sums at ~1e-7 per op; 16-bit formats
# round every activation, so a chunked forward drifts from a full one by up to ~1e-2.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 3e-2


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def baseline_error(engine: Engine, token_ids: torch.Tensor) -> float:
    """Relative error of the engine's baseline NLL against the model's own full forward."""
    rows = engine.evaluate("kvorch-exactness", token_ids, [EvalConfig(BaselinePress())])
    ours = sum(rows.column("nll_sum").to_pylist())
    model = engine.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            logits = model(token_ids[None].to(engine.device)).logits[:, :-1].float()
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    reference = float(token_nll(logits, token_ids[None, 1:].to(engine.device)).sum())
    return abs(ours - reference) / max(abs(reference), 1e-12)


def inexact_reason(engine: Engine, token_ids: torch.Tensor) -> str | None:
    """Why kvorch cannot evaluate this model exactly, or None when its baseline checks out."""
    error = baseline_error(engine, token_ids)
    allowed = tolerance(next(engine.model.parameters()).dtype)
    if error <= allowed:
        return None
    return (
        f"kvorch's baseline NLL differs from the model's own forward by {error:.1e} (relative, allowed {allowed:.0e}): "
        "its attention does something kvorch's does not reproduce"
    )
