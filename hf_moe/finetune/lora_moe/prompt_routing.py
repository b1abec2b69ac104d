"""Sequence-level routing: decisions taken on a sequence's prompt and kept for every later token.

Methods that choose experts per sequence (Mixture-of-LoRAs, MoCLE, Expert Gate) must not let a decision depend on
tokens not yet generated. Their layers (`SequenceRoutedLayer`) share one `PromptRouting` per forward of the model,
set by a forward pre-hook (`install_prompt_routing_hooks`):

- `prompt_mask` [B, S]: the prompt's real tokens, those before the first label != -100 (every real token of a
  forward without labels), so that a training forward on prompt + response decides as the inference forward on the
  prompt alone does;
- `choices`: the decisions, keyed by whoever takes them (a layer: `(id(layer), adapter)`; a decision shared by the
  whole model: a key naming it). Inside `generation_routing` (what `PeftModel.generate` runs in) the prefill fills
  them and every decoding step reuses them, with or without a cache; a forward on a cache that a prompt's forward
  returned reuses that forward's decisions (the cache carries them), so transformers' own `generate` with a cache
  keeps them too;
- `features` {layer: [B, hidden] fp32}: for the layers that ask (`SequenceRoutedLayer.prompt_feature_layers`), the
  mean over the prompt tokens of the frozen base model's hidden state after decoder layer l (l = 0: the input
  embeddings), computed once per prompt forward with every adapter disabled and without gradients, so that such a
  decision does not move while the adapters train (`prompt_features`).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

_GENERATION_CHOICES = "_prompt_routing_generation_choices"
_FORWARD_CHOICES = "_prompt_routing_forward_choices"
_CACHE_CHOICES = "_prompt_routing_choices"
_COMPUTING_FEATURES = "_prompt_routing_computing_features"


@dataclass
class PromptRouting:
    """Set on every `SequenceRoutedLayer` before a forward of the model (`_begin_prompt_routing`)."""

    prompt_mask: torch.Tensor | None  # [B, S] bool: the real prompt tokens; None = every token
    choices: dict  # key -> [B] decision of each sequence, taken on the prompt and kept
    continuing: bool = False  # a decoding step on a cache whose prompt decisions are unknown
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, hidden] fp32 frozen prompt features

    def decide(self, key, decision: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The decision stored under `key`, taken by `decision()` (and stored) when this prompt has none yet."""
        if key not in self.choices:
            self.choices[key] = decision()
        return self.choices[key]


class SequenceRoutedLayer:
    """Mixin of the layers that route per sequence: `prompt_routing` is this forward's shared state."""

    prompt_routing: PromptRouting | None = None

    def prompt_feature_layers(self) -> set[int]:
        """The decoder layers whose frozen prompt features this layer's active adapters read (none by default)."""
        return set()


def prompt_mask(args, kwargs) -> torch.Tensor | None:
    """[B, S] bool of the prompt's real tokens: attention_mask (all ones without it), cut before each row's first
    label != -100 when the forward has `labels` [B, S] (as a causal LM takes them, unshifted)."""
    inputs = _inputs(args, kwargs)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return None
    batch, length = inputs.shape[:2]
    attention_mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == (batch, length):
        mask = attention_mask.to(inputs.device).bool()
    else:
        mask = torch.ones(batch, length, dtype=torch.bool, device=inputs.device)
    if isinstance(labels, torch.Tensor) and labels.shape == (batch, length):
        response = labels.to(inputs.device).ne(-100)
        first = torch.where(response.any(dim=1), response.int().argmax(dim=1), length)
        mask = mask & (torch.arange(length, device=inputs.device) < first[:, None])
    return mask


def _inputs(args, kwargs):
    inputs = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if inputs is None else inputs


def pool_prompt(tokens: torch.Tensor, mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """[B, S, d] -> [B, d]: the prompt's tokens (`mask` [B, S], None = all) averaged ("prompt_mean") or its last one
    ("prompt_last"). A sequence without prompt tokens is an error: it has nothing to decide from."""
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"the prompt mask has shape {tuple(mask.shape)} but the input has "
                         f"{tuple(tokens.shape[:2])} tokens.")
    mask = mask.to(tokens.device)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"routing per sequence reads each sequence's prompt (its real tokens before the first label "
                         f"!= -100), but sequences {empty} have none: train on prompt/response data (a recipe's "
                         f"data.prompt_field and response_field, or messages_field).")
    if method == "prompt_mean":
        weights = mask.to(tokens.dtype).unsqueeze(-1)  # [B, S, 1]
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # the last prompt token of each row
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


# ----------------------------------------------------------------------------------------------------------------
# Frozen prompt features


class _FeaturesReady(Exception):
    """Raised by a decoder layer's forward hook to stop the base model's forward once the features are there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (`model.model.layers` for Llama, Mistral, Qwen, Gemma)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder layer list (`model.layers`) to read prompt features from.")


@contextmanager
def frozen_base(model: nn.Module):
    """Inside the block `model` runs as its frozen base model in eval mode: every adapter layer as its base layer
    (without touching requires_grad, as peft's `enable_adapters(False)` would) and no dropout; each module's switches
    are restored after."""
    modules = list(model.modules())
    adapters = [module for module in modules if isinstance(module, BaseTunerLayer)]
    disabled, training = [layer._disable_adapters for layer in adapters], [module.training for module in modules]
    for layer in adapters:
        layer._disable_adapters = True
    model.eval()
    try:
        yield
    finally:
        for layer, value in zip(adapters, disabled):
            layer._disable_adapters = value
        for module, value in zip(modules, training):
            module.training = value


@torch.no_grad()
def prompt_features(model: nn.Module, layer: int, mask: torch.Tensor | None, *, input_ids=None, inputs_embeds=None,
                    attention_mask=None, position_ids=None) -> torch.Tensor:
    """[B, hidden] fp32: the mean over the prompt tokens (`mask` [B, S]; None = all) of the frozen base model's
    hidden state after decoder layer `layer` (0 = the input embeddings; the last layer's output is taken before the
    model's final norm), with every adapter disabled and in eval mode (no dropout: the same features in training and
    at inference). `model` is the
    adapted transformers model (the PeftModel's base model); its own forward hooks do not run."""
    num_layers = len(decoder_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= num_layers:
        raise ValueError(f"the prompt-feature layer {layer!r} is invalid: it must be an int in [0, {num_layers}] "
                         f"(0 = the input embeddings, l = after decoder layer l).")
    if layer == 0:
        hidden = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
        return pool_prompt(hidden.float(), mask, "prompt_mean")

    def stop(module, args, output):
        raise _FeaturesReady(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer - 1].register_forward_hook(stop)
    model.__dict__[_COMPUTING_FEATURES] = True
    try:
        with frozen_base(model):
            model.forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False)
    except _FeaturesReady as ready:
        return pool_prompt(ready.hidden.float(), mask, "prompt_mean")
    finally:
        handle.remove()
        model.__dict__.pop(_COMPUTING_FEATURES, None)
    raise RuntimeError(f"the forward of {type(model).__name__} never reached decoder layer {layer}.")


# ----------------------------------------------------------------------------------------------------------------
# Hooks


def _cache_length(cache) -> int:
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0


def _input_cache(kwargs: dict):
    """The cache a forward continues: `cache` in transformers 5.25 (`past_key_values` before, still accepted)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _output_cache(output):
    """The cache a forward returns, read through the output's own field (`cache`, or `past_key_values` in older
    transformers) rather than the deprecated alias."""
    fields = getattr(output, "__dataclass_fields__", {})
    name = next((name for name in ("cache", "past_key_values") if name in fields), None)
    return getattr(output, name) if name is not None else None


def _begin_prompt_routing(model, args, kwargs):
    """Forward pre-hook: the prompt of this forward and where its decisions live. Inside `generation_routing` every
    forward shares one dict (the first, the prompt's, fills it); a forward on a cache that a prompt's forward returned
    reuses that forward's dict; any other forward starts an empty one, and computes the frozen prompt features its
    layers ask for. The state stays set after the forward, for the recomputation of activation checkpointing, which
    so applies the forward's choices."""
    if model.__dict__.get(_COMPUTING_FEATURES):
        return
    cache = _input_cache(kwargs)
    choices = model.__dict__.get(_GENERATION_CHOICES)
    if choices is None and cache is not None:
        choices = getattr(cache, _CACHE_CHOICES, None)
    continuing = choices is None and _cache_length(cache) > 0
    choices = {} if choices is None else choices
    model.__dict__[_FORWARD_CHOICES] = choices
    layers = [module for module in model.modules() if isinstance(module, SequenceRoutedLayer)]
    state = PromptRouting(prompt_mask(args, kwargs), choices, continuing)
    if not choices and not continuing:
        wanted = set().union(*(layer.prompt_feature_layers() for layer in layers))
        inputs = {name: kwargs.get(name) for name in ("inputs_embeds", "attention_mask", "position_ids")}
        inputs["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
        state.features = {index: prompt_features(model, index, state.prompt_mask, **inputs) for index in sorted(wanted)}
    for layer in layers:
        layer.prompt_routing = state


def _end_prompt_routing(model, args, kwargs, output):
    """Forward hook: the cache this forward returns remembers its decisions, for the decoding steps that follow."""
    if model.__dict__.get(_COMPUTING_FEATURES):
        return
    choices = model.__dict__.pop(_FORWARD_CHOICES, None)
    cache = _output_cache(output)
    if choices and cache is not None and getattr(cache, _CACHE_CHOICES, None) is not choices:
        try:
            setattr(cache, _CACHE_CHOICES, choices)
        except AttributeError:  # a cache type that takes no attribute: generate still keeps the choices
            pass


def install_prompt_routing_hooks(model: nn.Module) -> None:
    if _begin_prompt_routing not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_begin_prompt_routing, with_kwargs=True)
        model.register_forward_hook(_end_prompt_routing, with_kwargs=True)


def remove_prompt_routing_hooks(model: nn.Module) -> None:
    for hooks, extras in ((model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,)),
                          (model._forward_hooks, (model._forward_hooks_with_kwargs,))):
        for key in [key for key, hook in hooks.items() if hook in (_begin_prompt_routing, _end_prompt_routing)]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)


@contextmanager
def generation_routing(model: nn.Module, task_ids=None):
    """Within the block, the first forward of `model` (generate's prefill: the prompt) takes every sequence's
    decisions and every later forward keeps them, with a cache (one new token a step) or without (the whole sequence
    again). `task_ids`, when given, reach every step as in MOELoRA's `generation_task_ids`."""
    from .model import generation_task_ids  # model.py installs this module's hooks

    model.__dict__[_GENERATION_CHOICES] = {}
    try:
        if task_ids is None:
            yield
        else:
            with generation_task_ids(model, task_ids):
                yield
    finally:
        model.__dict__.pop(_GENERATION_CHOICES, None)
