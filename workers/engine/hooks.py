"""A loaded model hooked for kvorch, once: what every chunk step of every batch reads of it.

Hooking means two things, both observing, neither changing what the model computes: the model's
attention implementation becomes kvorch's attention function (workers/modeling/attention.py), and a
forward pre-hook on every attention module captures its input for presses that score from
hidden states (KVzap). Plus what is learned of the model once: each layer's attention variant
(from a one-token probe forward) and RoPE.
"""

from __future__ import annotations

import inspect

import torch

from workers.modeling import attention
from workers.modeling.rope import LayerRotary, model_rotate


class HookedModel:
    """The model with kvorch's hooks, its device, each layer's RoPE and attention variant."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.model.set_attn_implementation(attention.ATTENTION_NAME)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.model_type = str(getattr(model.config, "model_type", type(model).__name__))
        self.layer_rotaries = _layer_rotaries(model, self.model_type, self.device)
        self._variants: list[attention.AttentionVariant] | None = None
        # The attention modules' inputs of the current forward, per layer.
        self.hidden_states: dict[int, torch.Tensor] = {}
        self.attention_modules: dict[int, torch.nn.Module] = {}
        for module in model.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention"):
                self.attention_modules[module.layer_idx] = module
                module.register_forward_pre_hook(self._capture_hidden_states, with_kwargs=True)

    def _capture_hidden_states(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.hidden_states[module.layer_idx] = args[0] if args else kwargs["hidden_states"]

    def variants(self, token_ids: torch.Tensor) -> list[attention.AttentionVariant]:
        """Each layer's attention variant, from a one-token forward that records what every layer
        asks for; a layer that never reaches kvorch's attention is refused here."""
        if self._variants is None:
            probe = _VariantProbe(self.model.config.num_hidden_layers)
            self.model(input_ids=token_ids[:1][None].to(self.device), use_cache=False, kvorch_run=probe)
            self.hidden_states.clear()
            self._variants = check_every_layer_attended(self.model_type, probe.variants)
        return self._variants


def check_every_layer_attended(
    model_type: str, variants: list[attention.AttentionVariant | None]
) -> list[attention.AttentionVariant]:
    """A layer whose attention never reached kvorch's would attend unmasked: refuse the model."""
    missing = [layer for layer, variant in enumerate(variants) if variant is None]
    if missing:
        raise attention.UnsupportedAttention(
            f"{model_type}: layer(s) {missing} do not run their attention through transformers' "
            "attention interface, so kvorch cannot apply its keep-mask to them"
        )
    return list(variants)


class _VariantProbe:
    """An attention run that only records each layer's variant (and returns zeros)."""

    def __init__(self, n_layers: int) -> None:
        self.variants: list[attention.AttentionVariant | None] = [None] * n_layers

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        variant: attention.AttentionVariant,
    ) -> torch.Tensor:
        self.variants[layer] = variant
        b, h, c, _ = query.shape
        return query.new_zeros(b, c, h, value.shape[-1])


def _layer_rotaries(model: torch.nn.Module, model_type: str, device: torch.device) -> list[LayerRotary]:
    """Per layer, the model's RoPE as presses read it. Layers of one type share one object.

    Models with several RoPEs (Gemma 3: local and global layers with different bases) take a
    ``layer_type`` in their rotary module; the layer's type comes from ``config.layer_types``.
    A model without RoPE gets an object that refuses, naming the family, when a press calls it.
    """
    config = model.config
    n_layers = config.num_hidden_layers
    module = getattr(model.base_model, "rotary_emb", None)
    rotate = model_rotate(model)
    if module is None or rotate is None:
        reason = "have no rotary embedding" if module is None else "have a rotary embedding of unknown layout"

        def refuse(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise ValueError(f"it needs RoPE, and {model_type} models {reason}")

        return [LayerRotary(refuse, rotate or (lambda x: x))] * n_layers
    layer_types = list(getattr(config, "layer_types", None) or [None] * n_layers)
    takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters
    probe = torch.zeros(1, device=device, dtype=torch.float32)

    def embed_for(layer_type: str | None):
        def embed(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = {"layer_type": layer_type} if takes_layer_type else {}
            cos, sin = module(probe, positions[None], **extra)
            return cos[0].float(), sin[0].float()

        return embed

    by_type = {t: LayerRotary(embed_for(t if takes_layer_type else None), rotate) for t in set(layer_types)}
    return [by_type[t] for t in layer_types]
