"""KVzap training targets: the KVzip+ importance of every context key, from a reconstruction pass.

KVzip (Kim et al., 2025) scores a key by how much the model attends to it while repeating the
context; KVzip+ (the target KVzap regresses, arXiv:2601.07891) weighs that attention by what the
key contributes to the residual stream relative to the query's own input:

    target[g, i] = log max_{t in repeat, h in group g} A_h[t, i] * ||W_o^h v_i|| / ||h_t||

where A_h are the attention probabilities of query head h, W_o^h the columns of ``o_proj`` that
head h writes through, v_i the value of key i (kv-head g) and h_t the attention input at query t.

The sequence is ``context + prompt + context`` (the driver tokenizes the prompt through the
chat template); the repeat queries are every position after the context. Attention
probabilities come from the eager implementation itself (a forward hook on each attention
module), so they are exactly what the model computed; only the sampled context positions are
kept, which bounds memory per document.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import ray
import torch

from workers.contract.models import load_model

# Attention probabilities that underflow to 0 would give log(0) = -inf; clamp far below any threshold.
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class TargetDocument:
    """One training document as the driver prepares it: token ids of the context and the prompt."""

    doc_id: str
    context_ids: list[int]
    prompt_ids: list[int]
    repeat_ids: list[int]


@dataclass(frozen=True)
class TargetSamples:
    """Sampled context positions of one document: inputs ``hidden`` [L, S, D], ``targets`` [L, S, Hkv]."""

    doc_id: str
    positions: torch.Tensor
    hidden: torch.Tensor
    targets: torch.Tensor


def sample_positions(n_context: int, n_samples: int, seed: int) -> torch.Tensor:
    """Sorted random context positions (all when the context is shorter), reproducible per seed."""
    if n_samples >= n_context:
        return torch.arange(n_context)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_context, generator=generator)[:n_samples].sort().values


def kvzip_plus(
    attn: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, o_weight: torch.Tensor, n_context: int
) -> torch.Tensor:
    """The KVzip+ log-score of each context key per kv-head, for one layer of one sequence.

    ``attn`` [H, N, N] probabilities, ``values`` [Hkv, N, d], ``hidden`` [N, D] attention inputs,
    ``o_weight`` [D, H*d]. Returns [Hkv, n_context].
    """
    n_heads, n_kv = attn.shape[0], values.shape[0]
    head_dim = values.shape[-1]
    group = n_heads // n_kv
    w_o = o_weight.reshape(o_weight.shape[0], n_heads, head_dim).permute(1, 0, 2)  # [H, D, d]
    v_ctx = values[:, :n_context].repeat_interleave(group, dim=0)  # [H, n_ctx, d]
    v_norm = torch.linalg.vector_norm(v_ctx @ w_o.transpose(1, 2), dim=-1)  # [H, n_ctx]
    h_norm = torch.linalg.vector_norm(hidden[n_context:], dim=-1)  # [T]
    weighted = attn[:, n_context:, :n_context] * v_norm[:, None, :] / h_norm[None, :, None]  # [H, T, n_ctx]
    best = weighted.amax(dim=1).reshape(n_kv, group, n_context).amax(dim=1)
    return best.clamp_min(LOG_FLOOR).log()


class _LayerCapture:
    """Forward hooks on one attention module: reduce its eager probabilities to targets at once."""

    def __init__(self, module: torch.nn.Module, n_context: int, positions: torch.Tensor) -> None:
        self.module, self.n_context, self.positions = module, n_context, positions
        self.hidden: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self._inputs: torch.Tensor | None = None
        self.handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = (args[0] if args else kwargs["hidden_states"])[0]  # [N, D]

    def _after(self, module: torch.nn.Module, args: tuple, output: tuple) -> None:
        hidden, attn = self._inputs, output[1][0]
        n_kv = module.config.num_key_value_heads
        values = module.v_proj(hidden).reshape(hidden.shape[0], n_kv, -1).transpose(0, 1)
        scores = kvzip_plus(attn.float(), values.float(), hidden.float(), module.o_proj.weight.float(), self.n_context)
        self.targets = scores[:, self.positions].T.contiguous()  # [S, Hkv]
        self.hidden = hidden[self.positions].float().contiguous()  # [S, D]
        self._inputs = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(modules, key=lambda m: m.layer_idx)


@torch.no_grad()
def extract_targets(model: torch.nn.Module, doc: TargetDocument, n_samples: int, seed: int) -> TargetSamples:
    """One eager forward over ``context + prompt + repeat``; hidden states and targets of sampled keys."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # the hooks read the probabilities eager attention returns
    n_context = len(doc.context_ids)
    positions = sample_positions(n_context, n_samples, seed)
    captures = [_LayerCapture(m, n_context, positions) for m in attention_modules(model)]
    try:
        ids = torch.tensor(doc.context_ids + doc.prompt_ids + doc.repeat_ids, device=model.device)
        model.base_model(ids[None], use_cache=False)  # the decoder only: no logits needed
    finally:
        for capture in captures:
            capture.remove()
    return TargetSamples(
        doc.doc_id,
        positions,
        torch.stack([c.hidden.cpu() for c in captures]),
        torch.stack([c.targets.cpu() for c in captures]),
    )


class TargetWorker:
    """The body of a target-extraction actor: loads the model once, then extracts per document.

    It speaks the pool's readiness protocol (``placed``, then ``describe``, which loads the
    model), like EvalWorker, so the driver's pool places, times out and replaces it the same way.
    """

    def __init__(self, name: str, model: str, device: str, threads: int, load: bool = True) -> None:
        torch.set_num_threads(max(1, threads))
        self.name, self.model_id, self.device = name, model, device
        self.model: torch.nn.Module | None = None
        if load:
            self.describe()

    def placed(self) -> str:
        """The Ray node this actor runs on (answers before the model is loaded)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else platform.node()

    def describe(self) -> dict:
        """Loads the model (once) and says where it runs."""
        if self.model is None:
            self.model = load_model(self.model_id, "float32", self.device)
        return {"worker": self.name, "host": platform.node(), "device": self.device}

    def run(self, doc: TargetDocument, n_samples: int, seed: int) -> TargetSamples:
        self.describe()
        return extract_targets(self.model, doc, n_samples, seed)
