"""Tiny random-weight decoders of every family kvorch is tested on, and their support matrix.

Each family is built from its transformers config in memory (float32, 2 layers, GQA where the
family has it), with the attention variants that family is known for made small enough to
matter on a 70-token document: Mistral's and Gemma's sliding windows (16), Gemma 2's logit
soft-cap (1.0, where tanh bends the logits), Gemma 3's local/global RoPE bases, GPT-NeoX's
partial rotary, Cohere's interleaved rotary, and GPT-2/OPT without RoPE.

``python -m tests.families`` prints the support matrix docs/model-families.md shows; tests/test_families.py
checks that the page's table is this one.
"""

from __future__ import annotations

import torch
import transformers as T

from tests.helpers import full_forward_nll
from workers.contract.configs import EvalConfig
from workers.contract.defaults import LEADERBOARD_METHODS
from workers.contract.settings import EngineSettings
from workers.engine.core import Engine
from workers.presses import ALL_METHODS, REGISTRY

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_COMMON, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=4096)
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (T.LlamaConfig, _GQA),
    "mistral": (T.MistralConfig, dict(_GQA, sliding_window=16)),
    "qwen2": (T.Qwen2Config, _GQA),
    "qwen3": (T.Qwen3Config, dict(_GQA, head_dim=8)),
    "phi3": (T.Phi3Config, dict(_GQA, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "gemma2": (
        T.Gemma2Config,
        dict(_GQA, head_dim=8, sliding_window=16, attn_logit_softcapping=1.0, initializer_range=0.3),
    ),
    "gemma3": (
        T.Gemma3TextConfig,
        dict(_GQA, head_dim=8, sliding_window=16, sliding_window_pattern=2, rope_local_base_freq=100.0),
    ),
    "gpt_neox": (T.GPTNeoXConfig, dict(_COMMON, intermediate_size=64, rotary_pct=0.5, max_position_embeddings=4096)),
    "cohere": (T.CohereConfig, dict(_GQA, eos_token_id=1, bos_token_id=1, pad_token_id=0)),
    "gpt2": (
        T.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=4096, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1),
    ),
    "opt": (
        T.OPTConfig,
        dict(_COMMON, ffn_dim=64, max_position_embeddings=4096, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=1),
    ),
}
# Every built-in press that runs without a required parameter (kvzap needs a surrogate, the
# kvpress adapter kvpress itself), plus the head-aware press's parameter-free policy and the
# leaderboard's presses (issue 37).
PRESSES = (*ALL_METHODS, "head_aware", *(m for m in LEADERBOARD_METHODS if m not in ALL_METHODS))
# The presses that read pre-RoPE queries or keys: refused on a family without RoPE.
NEEDS_ROPE = ("expected_attention", "leverage", "compactor")
SETTINGS = EngineSettings(chunk_size=16, window=8)
N_TOKENS = 70


def tiny_decoder(family: str, seed: int = 0) -> torch.nn.Module:
    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config_class(**kwargs)).eval()


def document(seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (N_TOKENS,), generator=torch.Generator().manual_seed(seed))


def baseline_error(model: torch.nn.Module, tokens: torch.Tensor, settings: EngineSettings = SETTINGS) -> float:
    """Relative error of the engine's baseline NLL against one plain eager full-sequence forward."""
    reference = float(full_forward_nll(model, tokens).sum())
    rows = Engine(model, settings).evaluate("d", tokens, [EvalConfig(REGISTRY["baseline"]())])
    return abs(sum(rows.column("nll_sum").to_pylist()) - reference) / abs(reference)


def outcome(model: torch.nn.Module, press: str, tokens: torch.Tensor) -> str:
    """``exact`` (baseline within 1e-5 of a full forward), ``supported`` (runs), ``refused: why``
    (raises ValueError, the error the preflight turns into a submit-time refusal) or ``WRONG``."""
    if press == "baseline":
        return "exact" if baseline_error(model, tokens) < 1e-5 else "WRONG"
    try:
        Engine(model, SETTINGS).evaluate("d", tokens, [EvalConfig(REGISTRY[press]())])
    except ValueError as exc:
        return f"refused: {exc}"
    return "supported"


def support_matrix() -> dict[str, dict[str, str]]:
    tokens = document()
    return {family: {press: outcome(tiny_decoder(family), press, tokens) for press in PRESSES} for family in FAMILIES}


def markdown(matrix: dict[str, dict[str, str]]) -> str:
    """docs/model-families.md's table: one row per family, ``refused`` cells footnoted with their reason."""
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(PRESSES) + " |", "|---" * (len(PRESSES) + 1) + "|"]
    for family, cells in matrix.items():
        shown = []
        for press in PRESSES:
            cell = cells[press]
            if cell.startswith("refused: "):
                reason = cell.removeprefix("refused: ")
                if reason not in reasons:
                    reasons.append(reason)
                cell = f"refused[^{reasons.index(reason) + 1}]"
            shown.append(cell)
        lines.append(f"| {family} | " + " | ".join(shown) + " |")
    lines.append("")
    lines.extend(f"[^{i}]: {reason}" for i, reason in enumerate(reasons, start=1))
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(support_matrix()))
