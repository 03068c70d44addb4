"""A lean forward pass for Llama-architecture causal LMs, used by the decode loop on CPU.

Decoding one token of SmolLM2-135M through ``transformers`` took 59.5 ms on the idle 2-core machine, of which the
211 matrix-vector products over its 537 MB of fp32 weights were 30.7 ms: the other half was the framework's
per-module work (cache objects, masks, hooks, ~20 small ops per layer). This module runs the same computation with
the weights fused (q, k and v in one matrix, gate and up in another), a preallocated KV cache written in place, and
torch's fused attention, so a decode step is the matrix products plus a few element-wise ops per layer.

Weights are held in one of three forms:

- ``fp32``: the model's own weights. The logits match ``transformers``' within float rounding (a test checks it).
- ``int4`` (the default on CPUs with bf16 instructions, for weights that are already 4-bit): when every matrix is
  exactly 4-bit codes with one scale and offset per block of 32 inputs (a GGUF Q4_1 file, such as the default
  SmolLM2's, dequantised to fp32 is), the matrices are held as those codes, packed for
  ``torch._weight_int4pack_mm_for_cpu``: the file's own weights, nothing re-quantised, an eighth of the fp32 bytes
  per step. The kernel multiplies bf16 activations and returns bf16 (its scales and offsets are bf16 as well), so
  the outputs are within bf16 rounding of fp32's: over SmolLM2-135M, teacher-forced, the mean KL divergence to fp32
  is 0.0002 (int8's: 0.0024) and the next-token choice agrees at 99.4% of positions. llama.cpp, this file's own
  runtime, rounds activations to 8 bits. A prompt (more than a few tokens) multiplies bf16 copies of the fp32
  weights, and the output matrix (8-bit blocks in the file) is held as ``int8`` is, below. A model whose weights
  are not 4-bit blocks is never quantised to int4: ``precision = "int4"`` then fails, and "auto" keeps fp32.
- ``int8`` (opt-in, ``precision = "int8"``): weight-only int8, one scale per output row, a quarter of the bytes.
  Decoding is bound by reading the weights, so one decode step reads 135 MB instead of 537 MB. A step multiplies
  bf16 activations by the int8 weights (``torch._weight_int8pack_mm``); a prompt (more than a few tokens at once)
  dequantises each matrix to bf16 and multiplies there, which is faster than fp32 for a matrix-matrix product.
  Norms, rotary embedding, attention, the residual stream and the KV cache stay fp32. The kernel returns bf16,
  whose spacing among logits of 20 to 40 is 0.125 to 0.25, so the leading logits of each position are computed
  again from the fp32 output matrix. The outputs are close to fp32's, not equal.

``forward`` can also return the logits of several trailing positions, and ``LeanCache.length`` can be set back:
the decode loop checks drafted tokens in one pass and drops the ones it rejects (``generation.text._Drafter``).

Any model this does not cover (another architecture, biases, a rotary scheme ``transformers`` would compute
differently per position) keeps the ``transformers`` forward pass: ``unsupported_reason`` says why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

WeightForm = Literal["fp32", "int8", "int4"]

# Up to this many tokens at once, int8 weights are used as they are (matrix-vector work: reading the weights is the
# cost); a longer input (a prompt) dequantises each matrix to bf16 first (matrix-matrix work: compute is the cost).
# Measured on a 1536x576 matrix: 700 rows in 12.2 ms through the int8 kernel, 2.1 ms dequantised to bf16.
_INT8_DIRECT_ROWS = 8

# int4 weights: inputs per block of 4-bit codes sharing one scale and offset (GGUF's Q4_0/Q4_1 blocks).
INT4_BLOCK = 32

# With int8 weights, this many leading logits per position are recomputed in fp32 (see ``forward``).
_EXACT_TOP = 64

# Up to this many new tokens, attention is two batched products over the cache as it is stored (a step, or a step
# with drafted tokens to check); longer inputs (prompts) go through torch's fused attention.
_BMM_QUERIES = 16


def unsupported_reason(model: Any) -> str | None:
    """Why the lean forward pass cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the lean path covers llama)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", "linear", "llama3"):  # position-independent inverse frequencies only
        return f"rotary embedding type {kind!r}"
    return None


class NotFourBitError(ValueError):
    """The weights are not 4-bit blocks, so the ``int4`` form (which never re-quantises) cannot hold them."""


def int4_blocks(weight: Any) -> tuple[Any, Any, Any] | None:
    """``weight`` [out, in] as 4-bit codes [out, in] with a scale and an offset per block of ``INT4_BLOCK`` inputs
    [out, in / INT4_BLOCK], when every weight is exactly ``offset + scale * code`` (code 0..15, the block's minimum
    at code 0 and its maximum at code 15, the scale an fp16 number: how a GGUF Q4_1 block dequantises); None when
    any weight is not."""
    import torch

    rows, cols = weight.shape
    if cols % INT4_BLOCK:
        return None
    w = weight.detach().float()
    blocks = w.view(rows, cols // INT4_BLOCK, INT4_BLOCK)
    offset = blocks.amin(dim=-1)
    scale = ((blocks.amax(dim=-1) - offset) / 15).half().float()
    codes = torch.round((blocks - offset[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None])
    if codes.max() > 15 or not torch.equal(codes * scale[..., None] + offset[..., None], blocks):
        return None
    return codes.view(rows, cols), scale, offset


class _Linear:
    """One weight matrix: fp32, int8 with per-row scales, or the 4-bit blocks it already is.

    ``saved``: the int8/int4 tensors this matrix made before (``parts()``, kept on disk by ``LeanDecoder``'s
    ``store``), used instead of deriving them again from ``weight``."""

    PARTS = {"fp32": (), "int8": ("weight", "scale"), "int4": ("packed", "scale_zero")}

    def __init__(self, weight: Any, form: WeightForm, saved: dict[str, Any] | None = None) -> None:
        import torch

        self.form = form
        rows, cols = weight.shape
        if form == "fp32":
            self.weight = weight.detach().float().contiguous()
            return
        if form == "int4":
            self.weight = weight.detach().float().contiguous()  # prompts: bf16 copies of it (see __call__)
            if saved is not None:
                self.packed, self.scale_zero = saved["packed"], saved["scale_zero"]
                if (tuple(self.packed.shape) != (rows, cols // 2)
                        or tuple(self.scale_zero.shape) != (cols // INT4_BLOCK, rows, 2)):
                    raise ValueError("saved int4 parts do not fit the matrix")
                return
            blocks = int4_blocks(weight)
            if blocks is None:
                raise NotFourBitError(f"a {tuple(weight.shape)} matrix is not 4-bit codes in blocks of {INT4_BLOCK}")
            codes, scale, offset = blocks
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
            # The kernel computes (code - 8) * scale + zero per block: zero = offset + 8 * scale.
            self.scale_zero = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
            return
        if saved is not None:
            self.weight, self.scale = saved["weight"], saved["scale"]
            if tuple(self.weight.shape) != (rows, cols) or tuple(self.scale.shape) != (rows,):
                raise ValueError("saved int8 parts do not fit the matrix")
            return
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()

    def parts(self) -> dict[str, Any]:
        """The tensors derived from the fp32 weights (none for fp32), as ``saved`` takes them back."""
        return {name: getattr(self, name) for name in self.PARTS[self.form]}

    def __call__(self, x: Any) -> Any:
        """``x @ weight.T``: fp32 for fp32 weights, bf16 for int8 weights."""
        import torch

        if self.form == "fp32":
            return torch.nn.functional.linear(x, self.weight)
        xb = x.to(torch.bfloat16)
        if self.form == "int4":
            if x.shape[0] <= _INT8_DIRECT_ROWS:
                return torch._weight_int4pack_mm_for_cpu(xb.contiguous(), self.packed, INT4_BLOCK, self.scale_zero)
            return torch.nn.functional.linear(xb, self.weight.to(torch.bfloat16))
        if x.shape[0] <= _INT8_DIRECT_ROWS:
            out = torch._weight_int8pack_mm(xb, self.weight, self.scale)
        else:
            out = torch.nn.functional.linear(xb, self.weight.to(torch.bfloat16) * self.scale[:, None])
        return out  # bf16: the caller adds it to the fp32 residual stream or feeds it to the next product

    @property
    def nbytes(self) -> int:
        """Bytes of weights one decode step reads for this matrix."""
        if self.form == "int4":
            return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2
        extra = self.scale.numel() * self.scale.element_size() if self.form == "int8" else 0
        return self.weight.numel() * self.weight.element_size() + extra


@dataclass
class _Layer:
    norm_in: Any
    qkv: _Linear
    out: _Linear
    norm_post: Any
    gate_up: _Linear
    down: _Linear


def _rows(fused: Any, modules: tuple[Any, ...]) -> list[Any]:
    """``fused`` split back into the row blocks of ``modules``' weights (views, no copies)."""
    return list(fused.split([m.weight.shape[0] for m in modules]))


def _read_store(store: "Path", form: str) -> dict[str, Any] | None:
    """The tensors a previous build saved in ``store`` for ``form`` with this torch (None: none usable)."""
    import torch

    if not store.is_file():
        return None
    try:
        saved = torch.load(store, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is rebuilt, never trusted
        logger.warning("cannot read the lean decoder's saved weights %s (%s); deriving them again", store, exc)
        return None
    if not isinstance(saved, dict) or saved.get("form") != form or saved.get("torch") != str(torch.__version__):
        return None
    return saved


def _write_store(store: "Path", form: str, parts: dict[str, Any]) -> None:
    """Save ``parts`` atomically (a killed write leaves no half file); a failure costs only the next start's time."""
    import torch

    staging = store.with_name(f"{store.name}.tmp-{os.getpid()}")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"form": form, "torch": str(torch.__version__), **parts}, staging)
        os.replace(staging, store)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        logger.warning("cannot keep the lean decoder's %s weights in %s (%s); the next start derives them again",
                       form, store, exc)


class LeanCache:
    """The KV cache: per layer, keys and values preallocated and written in place; grows by doubling."""

    def __init__(self, decoder: "LeanDecoder") -> None:
        self.decoder = decoder
        self.length = 0
        self.keys: list[Any] = []
        self.values: list[Any] = []

    def reserve(self, needed: int) -> None:
        import torch

        capacity = self.values[0].shape[1] if self.values else 0
        if needed <= capacity:
            return
        d = self.decoder
        size = min(max(needed * 2, 512), max(d.max_positions, needed))
        n = self.length
        for i in range(d.layers_n):
            keys = torch.empty(d.kv_heads, d.head_dim, size)  # transposed: a query's scores are one product
            values = torch.empty(d.kv_heads, size, d.head_dim)
            if i < len(self.values):
                keys[:, :, :n] = self.keys[i][:, :, :n]
                values[:, :n] = self.values[i][:, :n]
                self.keys[i], self.values[i] = keys, values
            else:
                self.keys.append(keys)
                self.values.append(values)


class LeanDecoder:
    """The forward pass of a Llama-architecture model over fused weights and a :class:`LeanCache`."""

    def __init__(self, model: Any, form: WeightForm = "fp32", store: "Path | None" = None) -> None:
        """``store``: a file keeping the int8/int4 tensors derived from the weights, written on the first build and
        read on later ones (a second start then skips deriving them); None derives them every time."""
        import torch

        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean decoder does not cover this model: {reason}")
        if form == "int8" and not hasattr(torch, "_weight_int8pack_mm"):
            raise ValueError("int8 weights need torch._weight_int8pack_mm (torch >= 2.3)")
        if form == "int4" and not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            raise ValueError("int4 weights need torch._weight_int4pack_mm_for_cpu (torch >= 2.6)")
        config = model.config
        self.form = form
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.max_positions = int(getattr(config, "max_position_embeddings", 4096) or 4096)
        body = model.model
        self.layers_n = len(body.layers)
        self.embed = body.embed_tokens.weight.detach()
        saved = _read_store(store, form) if store is not None and form != "fp32" else None
        try:
            self._build(model, form, saved)
        except ValueError:
            if saved is None:
                raise
            logger.warning("the lean decoder's saved %s weights in %s do not fit this model; deriving them again",
                           form, store)
            saved = None
            self._build(model, form, None)
        if store is not None and form != "fp32" and saved is None:
            _write_store(store, form, self._parts())
        self.intermediate = self.layers[0].down.weight.shape[1]
        # Rotary inverse frequencies and attention scaling exactly as transformers computes them for this config.
        rotary = body.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.scale = float(getattr(model.model.layers[0].self_attn, "scaling", self.head_dim ** -0.5))

    def _build(self, model: Any, form: WeightForm, saved: dict[str, Any] | None) -> None:
        import torch

        def linear(name: str, weight: Any, kind: WeightForm) -> _Linear:
            parts = None
            if saved is not None and kind != "fp32":
                parts = {part: saved.get(f"{name}.{part}") for part in _Linear.PARTS[kind]}
                if any(value is None for value in parts.values()):
                    raise ValueError(f"{name} is missing from the saved weights")
            return _Linear(weight, kind, parts)

        body = model.model
        self.layers = []
        for i, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                norm_in=layer.input_layernorm.weight.detach().float(),
                qkv=linear(f"layers.{i}.qkv", torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                           form),
                out=linear(f"layers.{i}.out", attn.o_proj.weight, form),
                norm_post=layer.post_attention_layernorm.weight.detach().float(),
                gate_up=linear(f"layers.{i}.gate_up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), form),
                down=linear(f"layers.{i}.down", mlp.down_proj.weight, form),
            ))
        if form in ("fp32", "int4"):
            self._share_weights(body)
        self.norm = body.norm.weight.detach().float()
        # int8 and int4: the output matrix in int8, its leading logits computed again from the fp32 matrix (the
        # model's own, shared).
        self.head = linear("head", model.lm_head.weight, "fp32" if form == "fp32" else "int8")
        self.head_fp32 = model.lm_head.weight.detach() if form != "fp32" else None

    def _parts(self) -> dict[str, Any]:
        named = {"head": self.head}
        for i, layer in enumerate(self.layers):
            named.update({f"layers.{i}.{key}": getattr(layer, key) for key in ("qkv", "out", "gate_up", "down")})
        return {f"{name}.{part}": tensor for name, linear in named.items() for part, tensor in linear.parts().items()}

    def _share_weights(self, body: Any) -> None:
        """Point the model's own fp32 matrices at slices of the fused ones: one copy of the weights in memory."""
        import torch

        for layer, fused in zip(body.layers, self.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            for module, part in zip((attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj),
                                    (*_rows(fused.qkv.weight, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                     *_rows(fused.gate_up.weight, (mlp.gate_proj, mlp.up_proj))), strict=True):
                if module.weight.dtype == torch.float32:
                    module.weight = torch.nn.Parameter(part, requires_grad=False)

    @property
    def weight_bytes(self) -> int:
        parts = [self.head] + [p for layer in self.layers for p in (layer.qkv, layer.out, layer.gate_up, layer.down)]
        return sum(p.nbytes for p in parts)

    def new_cache(self) -> LeanCache:
        return LeanCache(self)

    def forward(self, tokens: list[int], cache: LeanCache, last: int = 1) -> Any:
        """Run ``tokens`` after what ``cache`` holds; returns the last position's logits (fp32, 1-D), or with
        ``last`` > 1 the last ``last`` positions' logits as rows (2-D, for checking several drafted tokens at once).

        ``cache.length`` may be set back to drop positions (rejected drafted tokens): they are overwritten."""
        import torch
        import torch.nn.functional as F

        n = len(tokens)
        start = cache.length
        end = start + n
        cache.reserve(end)
        positions = torch.arange(start, end, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos = (angles.cos() * self.rope_scale)[None]
        sin = (angles.sin() * self.rope_scale)[None]
        half = self.head_dim // 2
        mask = None
        if n > 1:  # each new token sees the cache and the new tokens up to itself
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        h = self.embed[torch.tensor(tokens)].float()
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qk_heads = self.heads + self.kv_heads
        group = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (h.shape[-1],), layer.norm_in, self.eps)
            qkv = layer.qkv(x).float()
            # Rotary embedding on queries and keys at once: [heads + kv_heads, n, head_dim].
            qk = qkv[:, :q_size + kv_size].view(n, qk_heads, self.head_dim).transpose(0, 1)
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            keys, values = cache.keys[i], cache.values[i]  # keys stored transposed: [kv_heads, head_dim, length]
            keys[:, :, start:end] = qk[self.heads:].transpose(1, 2)
            values[:, start:end] = qkv[:, q_size + kv_size:].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            if n <= _BMM_QUERIES:  # few queries: each key/value head's grouped queries as rows of one product
                q = qk[:self.heads].reshape(self.kv_heads, group * n, self.head_dim)
                scores = torch.bmm(q * self.scale, keys[:, :, :end])
                if mask is not None:
                    scores = scores.view(self.kv_heads, group, n, end).masked_fill(~mask, float("-inf"))
                attended = torch.bmm(scores.view(self.kv_heads, group * n, end).softmax(-1), values[:, :end])
                attended = attended.view(self.heads, n, self.head_dim).transpose(0, 1).reshape(n, q_size)
            else:
                attended = F.scaled_dot_product_attention(
                    qk[None, :self.heads], keys[None, :, :, :end].transpose(2, 3).contiguous(), values[None, :, :end],
                    attn_mask=mask, scale=self.scale, enable_gqa=self.heads != self.kv_heads)[0].transpose(0, 1).reshape(n, q_size)
            h = h + layer.out(attended)
            x = F.rms_norm(h, (h.shape[-1],), layer.norm_post, self.eps)
            gate, up = layer.gate_up(x).float().split(self.intermediate, dim=-1)  # the gating in fp32
            h = h + layer.down(F.silu(gate) * up)
        cache.length = end
        x = F.rms_norm(h[-last:], (h.shape[-1],), self.norm, self.eps)
        logits = self.head(x).float()
        if self.head_fp32 is not None:
            # int8 logits come back in bf16, whose spacing at 20 to 40 is 0.125 to 0.25: near-ties at the top
            # would be decided by rounding. The leading candidates get their fp32 logits (a few rows of the
            # fp32 matrix), so the choice among them is the fp32 weights' choice for this hidden state.
            top = logits.topk(_EXACT_TOP, dim=-1).indices
            exact = torch.bmm(self.head_fp32[top], x.float()[:, :, None])[:, :, 0]
            logits.scatter_(1, top, exact)
        return logits[0] if last == 1 else logits
