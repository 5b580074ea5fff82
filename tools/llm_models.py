"""Small decoder LLMs in plain torch (no `transformers`): a Llama/Qwen/Mistral-style decoder (RMSNorm,
rotary embeddings, grouped-query attention, SwiGLU MLP, causal mask, tied embeddings, optional KV cache)
and a GPT-2-style one (fused c_attn Conv1D split into q, k, v; GELU MLP; LayerNorm)."""

from __future__ import annotations

import math

import torch
from torch import nn

LLAMA = {"vocab": 50, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "intermediate": 48, "layers": 2,
         "max_positions": 64}
GPT2 = {"vocab": 50, "hidden": 32, "heads": 4, "layers": 2, "positions": 16}


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight: Pow, ReduceMean, Add, Sqrt, Div (or Reciprocal), Mul."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(dim)), eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, repeats: int, interleave: bool = False):
    """Each KV head serves `repeats` query heads: transformers' repeat_kv (expand + reshape), or
    torch.repeat_interleave along the heads."""
    if interleave:
        return torch.repeat_interleave(x, repeats, dim=1)
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, repeats, t, d).reshape(b, kv * repeats, t, d)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c["heads"], c["kv_heads"], c["head_dim"]
        e = c["hidden"]
        self.q_proj = nn.Linear(e, self.heads * self.head_dim, bias=True)  # Qwen's q/k/v have biases
        self.k_proj = nn.Linear(e, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(e, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, e, bias=False)
        self.interleave = c.get("interleave", False)

    def forward(self, x, cos, sin, mask, past=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        repeats = self.heads // self.kv_heads
        k, v = repeat_kv(k, repeats, self.interleave), repeat_kv(v, repeats, self.interleave)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)), present


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: dict):
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden"], c["intermediate"], bias=False)
        self.up_proj = nn.Linear(c["hidden"], c["intermediate"], bias=False)
        self.down_proj = nn.Linear(c["intermediate"], c["hidden"], bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(c["hidden"]), Attention(c)
        self.post_attention_layernorm, self.mlp = RMSNorm(c["hidden"]), MLP(c)

    def forward(self, x, cos, sin, mask, past=None):
        attended, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(nn.Module):
    """Token embedding -> decoder layers -> RMSNorm -> lm_head tied to the embedding. With `cache`,
    forward(tokens, past_k0, past_v0, ...) -> (logits, present_k0, present_v0, ...)."""

    def __init__(self, c: dict = LLAMA, cache: bool = False):
        super().__init__()
        self.c, self.cache = c, cache
        self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        d = c["head_dim"]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(c["max_positions"]).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def forward(self, tokens, *past):
        t = tokens.shape[1]
        start = past[0].shape[2] if past else 0
        cos, sin = self.cos_cached[start:start + t], self.sin_cached[start:start + t]
        mask = torch.full((t, start + t), float("-inf")).triu(start + 1)
        x = self.embed_tokens(tokens)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, mask, (past[2 * i], past[2 * i + 1]) if past else None)
            presents += present
        logits = self.lm_head(self.norm(x))
        return (logits, *presents) if self.cache else logits


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a Linear with the weight stored [in, out], computed with addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.1), nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        e = c["hidden"]
        self.heads, self.head_dim = c["heads"], e // c["heads"]
        self.ln_1, self.ln_2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.c_attn, self.c_proj = Conv1D(3 * e, e), Conv1D(e, e)
        self.c_fc, self.mlp_proj = Conv1D(4 * e, e), Conv1D(e, 4 * e)
        t = c["positions"]
        self.register_buffer("bias", torch.tril(torch.ones(t, t, dtype=torch.bool)).view(1, 1, t, t), persistent=False)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(e, dim=2)

        def heads(z):
            return z.view(b, t, self.heads, self.head_dim).permute(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = torch.where(self.bias[:, :, :t, :t], scores, torch.finfo(scores.dtype).min)
        out = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).contiguous().view(b, t, e)
        x = x + self.c_proj(out)
        return x + self.mlp_proj(gelu_new(self.c_fc(self.ln_2(x))))


class GPT2Model(nn.Module):
    def __init__(self, c: dict = GPT2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c["vocab"], c["hidden"]), nn.Embedding(c["positions"], c["hidden"])
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c["layers"]))
        self.ln_f = nn.LayerNorm(c["hidden"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
