"""A direct forward for Llama models: the decoder-layer loop without transformers' per-call wrappers.

`LlamaForCausalLM(...)` reaches the math through layers of Python on every call: output capturing and config-default
decorators on the model, a deprecated-kwarg wrapper and the gradient-checkpointing `__call__` on each decoder layer,
another wrapper and an attention-interface lookup on each attention module, kwargs dictionaries rebuilt at every
level. On a CPU decode step of the default model (30 layers, one token) that is milliseconds of a ~30 ms step.

`direct_logits` runs the same operations in the same order as transformers' Llama code, and calls the model's own
modules for every part that holds weights (embedding, norms, projections, MLP, lm_head), so a quantised or
oneDNN-prepacked Linear works unchanged and the logits are bit-identical to `model(...)` with the paged attention
function. It is used only where `supports_direct_forward` recognises the exact transformers classes; any other
architecture (or a model dispatched over devices by accelerate's hooks) keeps `model(...)`. Where the runner joined a
layer's projections (server/engine/joined_projections.py), the loop calls the joined module once and ropes the query
and key heads together; the numbers are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from fitserve.server.engine.joined_projections import GATE_UP_NAME, QKV_NAME
from fitserve.server.engine.kv_cache import PackedBatch, paged_attention


def supports_direct_forward(model: torch.nn.Module) -> bool:
    """True when `model` is exactly transformers' `LlamaForCausalLM` built of its own layer classes, on one device
    without accelerate dispatch hooks (the hooks move tensors between devices inside module calls this skips)."""
    from transformers.models.llama import modeling_llama as llama

    if type(model) is not llama.LlamaForCausalLM or type(model.model) is not llama.LlamaModel:
        return False
    inner = model.model
    if len(inner.layers) != model.config.num_hidden_layers:
        return False
    for layer in inner.layers:
        if (
            type(layer) is not llama.LlamaDecoderLayer
            or type(layer.self_attn) is not llama.LlamaAttention
            or type(layer.mlp) is not llama.LlamaMLP
            or type(layer.input_layernorm) is not llama.LlamaRMSNorm
            or type(layer.post_attention_layernorm) is not llama.LlamaRMSNorm
        ):
            return False
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return False
    return len({p.device for p in model.parameters()}) == 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def direct_logits(
    model: Any,  # transformers' LlamaForCausalLM, as `supports_direct_forward` checked
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    keep: torch.Tensor | None,
    batch: PackedBatch,
) -> torch.Tensor:
    """Logits [len(keep), vocab] of a packed batch (`input_ids`/`position_ids` [1, tokens]; `keep` None: every
    token), the K/V of every token written into the paged cache: what `model(input_ids=..., position_ids=...,
    logits_to_keep=keep, ...).logits[0]` gives."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    tokens = input_ids.shape[1]
    for layer in inner.layers:
        attn = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        head_shape = (1, tokens, -1, attn.head_dim)
        qkv_proj = getattr(attn, QKV_NAME, None)
        if qkv_proj is None:
            q = attn.q_proj(x).view(head_shape).transpose(1, 2)
            k = attn.k_proj(x).view(head_shape).transpose(1, 2)
            v = attn.v_proj(x).view(head_shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
        else:  # one matmul, and the rotary embedding applied to the query and key heads in one pass
            heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
            qkv = qkv_proj(x).view(head_shape)
            qk = qkv[:, :, : heads + kv_heads].transpose(1, 2)
            qk = (qk * cos) + (_rotate_half(qk) * sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        out = paged_attention(attn.layer_idx, q, k, v, batch, attn.scaling)
        hidden = residual + attn.o_proj(out.reshape(1, tokens, -1).contiguous())
        residual = hidden
        x = layer.post_attention_layernorm(hidden)
        mlp = layer.mlp
        gate_up_proj = getattr(mlp, GATE_UP_NAME, None)
        if gate_up_proj is None:
            hidden = residual + mlp(x)
        else:
            gate_up = gate_up_proj(x)
            width = gate_up.shape[-1] // 2
            hidden = residual + mlp.down_proj(mlp.act_fn(gate_up[..., :width]) * gate_up[..., width:])
    hidden = inner.norm(hidden)
    return model.lm_head(hidden if keep is None else hidden[:, keep, :])[0]
