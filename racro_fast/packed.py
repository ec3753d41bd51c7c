"""The policy forward with each question computed once: its images through the vision tower once,
its prompt through the decoder once, and its G captions attending to that prompt, all in one
packed row with no padding.

    groups = group_samples(samples)               # runs of samples that share a prompt: [[0, 1, 2, 3], ...]
    batch = pack(model, samples, groups, device, cache_vision=False)  # (1, T) tokens, (3, 1, T) positions
    h, y = packed_hidden(model, batch)            # (N, D), (N,): the caption tokens, sample by sample

Packed row of a micro-batch: [prompt_1, caption_1.1, ..., caption_1.G, prompt_2, caption_2.1, ...].
Attention runs per segment (`varlen_attention`): a prompt attends causally to itself, a caption to
[its prompt; itself] (causal, aligned at the end). That is flash-attn's varlen call with the keys
gathered per segment, or, where flash-attn is not installed, torch's own
`torch.nn.attention.varlen.varlen_attn` (CUDA; causal through window_size=(-1, 0), GQA through
enable_gqa; no dropout); on other devices the same segments go through SDPA, those of one shape
(captions of one length under prompts of one length) in one batched call (exact). On CPU they go
through torch's CPU flash kernel and its backward kernel (`_SegmentsCPU`) without gathering a
prompt's keys once per caption: a question's captions attend their prompt's keys as one run of
queries and their own keys apart, the two merged by log-sum-exp.
The CPU tests run the loop, and the arguments of both varlen calls through plain-torch renderings
of their documented contracts.

Positions: Qwen2.5-VL's 3-D rotary positions of the prompt are `get_rope_index`'s; a caption's
continue from the prompt's largest position + 1 on all three axes, as they do in a full row.
The hidden state of a prompt's last token predicts the first token of each of its captions: it is
computed once and gathered G times, so its gradient sums over the captions.

Image features are computed once per question per forward. With the vision tower frozen they are
computed once per step: the first pass stores them on the samples (`Sample.image_embeds`, shared by
a question's samples) and later passes (old, reference, update) reuse them.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor
import torch.nn.functional as F

from racro_fast.prompts import mm_token_types

PACKED_PREFIX = "racro_packed_"  # attention implementation names: racro_packed_sdpa, racro_packed_flash_attention_2


# ----------------------------------------------------------------------------- attention

@dataclass
class VarlenLayout:
    """Segments of one packed row: queries are the row itself, cut at `cu_q`; the keys of segment i
    are the packed positions kv_index[cu_k[i]:cu_k[i + 1]] (a prompt's own tokens; a caption's
    prompt then its own tokens). Causal, aligned at the end of the keys."""
    cu_q: list[int]  # (S + 1,)
    cu_k: list[int]  # (S + 1,)
    kv_index: Tensor  # (cu_k[-1],) long
    _cache: dict = field(default_factory=dict)  # masks and flash-attn's arguments, built once for every layer

    def mask(self, q_len: int, k_len: int, device) -> Tensor:
        """The causal mask of a q_len x k_len segment aligned at the end of the keys (True where a
        query sees a key)."""
        key = (q_len, k_len)
        if key not in self._cache:
            self._cache[key] = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return self._cache[key]

    def group_keys(self, segments: list[int], device) -> Tensor:
        """The key positions of `segments`, one segment's after another's (built once for every layer)."""
        key = ("keys", tuple(segments))
        if key not in self._cache:
            self._cache[key] = torch.cat([self.kv_index[self.cu_k[i]:self.cu_k[i + 1]] for i in segments]).to(device)
        return self._cache[key]

    def shape_groups(self, device) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """The non-empty segments by shape (Lq, Lk), each group as (segments, their key positions
        (one segment's after another's), the causal mask of Lq < Lk or None for Lq == Lk); built
        once for every layer."""
        key = "groups"
        if key not in self._cache:
            shapes: dict[tuple[int, int], list[int]] = {}
            for i in range(len(self.cu_q) - 1):
                lq, lk = self.cu_q[i + 1] - self.cu_q[i], self.cu_k[i + 1] - self.cu_k[i]
                if lq:
                    shapes.setdefault((lq, lk), []).append(i)
            self._cache[key] = [(idx, self.group_keys(idx, device), None if lq == lk else self.mask(lq, lk, device))
                                for (lq, lk), idx in shapes.items()]
        return self._cache[key]

    def cascade_calls(self, device) -> tuple[list[tuple[int, Tensor, Tensor]], list[tuple[int, Tensor, Tensor]]]:
        """The segments as `_SegmentsCPU`'s two kinds of attention call, each (n, query positions,
        key positions) of n runs of one shape, one run after another; built once for every layer.

        own: the segments by length L, each one's queries over its last L keys (causal, square).
        prefix: the keys before those (a caption's prompt), which every query of the segment sees:
        the segments after the same prefix (a question's captions) as one run of queries over it,
        the runs of one shape (prefix length, queries) in one call."""
        if "cascade" not in self._cache:
            own: dict[int, list[int]] = {}
            runs: dict[tuple[int, ...], list[int]] = {}  # prefix positions -> its segments
            for i in range(len(self.cu_q) - 1):
                lq, lk = self.cu_q[i + 1] - self.cu_q[i], self.cu_k[i + 1] - self.cu_k[i]
                if lq:
                    own.setdefault(lq, []).append(i)
                    if lk > lq:
                        runs.setdefault(tuple(self.kv_index[self.cu_k[i]:self.cu_k[i + 1] - lq].tolist()), []).append(i)
            queries = lambda idx: torch.cat([torch.arange(self.cu_q[i], self.cu_q[i + 1]) for i in idx])  # noqa: E731
            own_calls = [(len(idx), queries(idx).to(device),
                          torch.cat([self.kv_index[self.cu_k[i + 1] - lq:self.cu_k[i + 1]] for i in idx]).to(device))
                         for lq, idx in own.items()]
            shapes: dict[tuple[int, int], list[tuple[tuple[int, ...], Tensor]]] = {}
            for prefix, idx in runs.items():
                q = queries(idx)
                shapes.setdefault((len(prefix), len(q)), []).append((prefix, q))
            prefix_calls = [(len(items), torch.cat([q for _, q in items]).to(device),
                             torch.tensor([p for prefix, _ in items for p in prefix], device=device))
                            for items in shapes.values()]
            self._cache["cascade"] = own_calls, prefix_calls
        return self._cache["cascade"]

    def flash_args(self, device) -> tuple[Tensor, Tensor, int, int]:
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) on the device."""
        if "flash" not in self._cache:
            self._cache["flash"] = (
                torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                torch.tensor(self.cu_k, dtype=torch.int32, device=device),
                max(b - a for a, b in zip(self.cu_q, self.cu_q[1:])),
                max(b - a for a, b in zip(self.cu_k, self.cu_k[1:])))
        return self._cache["flash"]


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float, dropout: float = 0.0,
                     flash=None) -> Tensor:
    """q (1, H, T, d), k and v (1, Hkv, T, d) of the packed row -> (1, T, H, d).

    flash: a function with flash_attn_varlen_func's signature and contract; by default on CUDA
    flash-attn's own when it imports, else torch's varlen_attn behind that signature (without
    dropout); elsewhere the segments go through SDPA, those of one shape in one batched call, or on
    CPU without dropout through torch's CPU flash kernel (`_SegmentsCPU`)."""
    if flash is None and q.is_cuda:
        flash = _flash_varlen() or (_torch_varlen(varlen_attn_fn()) if dropout == 0.0 else None)
    if flash is None:
        return _segments_by_shape(q, k, v, layout, scale, dropout, gqa=q.shape[1] != k.shape[1])
    kc = k[0].index_select(1, layout.kv_index)  # (Hkv, K, d): each segment's keys, prompts repeated per caption
    vc = v[0].index_select(1, layout.kv_index)
    cu_q, cu_k, max_q, max_k = layout.flash_args(q.device)
    # (total, heads, d) in and out; causal masks are aligned at the end of the keys (flash-attn >= 2.1)
    o = flash(q[0].transpose(0, 1), kc.transpose(0, 1), vc.transpose(0, 1), cu_q, cu_k, max_q, max_k,
              dropout_p=dropout, softmax_scale=scale, causal=True)  # (T, H, d)
    return o.unsqueeze(0)


def _segments_by_shape(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float, dropout: float,
                       gqa: bool) -> Tensor:
    """The segments through SDPA, those of one shape (captions of one length under prompts of one
    length; prompts of one length) in one batched call, each segment's keys gathered once; on CPU
    without dropout `_SegmentsCPU`, which gathers no prompt's keys per caption. -> (1, T, H, d)"""
    if q.device.type == "cpu" and dropout == 0.0:  # torch's CPU flash kernel, the one SDPA runs there
        return _SegmentsCPU.apply(q[0], k[0], v[0], layout.cascade_calls(q.device), scale).transpose(0, 1).unsqueeze(0)
    len_q = [b - a for a, b in zip(layout.cu_q, layout.cu_q[1:])]
    # split, not a slice per segment: the backward of a slice writes into zeros of the whole row
    # (S segments cost S rows' memory traffic), one split's backward is one concatenation
    qs = q[0].split(len_q, dim=1)  # (H, Lq, d) each
    out: list[Tensor | None] = [None] * len(len_q)
    k0, v0 = k[0], v[0]  # (Hkv, T, d)
    for idx, keys, mask in layout.shape_groups(q.device):
        kb, vb = _gather(k0, keys, len(idx)), _gather(v0, keys, len(idx))
        qb = qs[idx[0]][None] if len(idx) == 1 else torch.stack([qs[i] for i in idx])  # (N, H, Lq, d)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           dropout_p=dropout, enable_gqa=gqa)  # (N, H, Lq, d)
        for i, oi in zip(idx, o.unbind(0)):
            out[i] = oi
    return torch.cat([o for o in out if o is not None], dim=1).transpose(0, 1).unsqueeze(0)


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Two attention results of the same queries over two disjoint sets of keys, each an output
    (..., d) and its float32 log-sum-exp (...), as the attention over both sets: the output (in
    o1's dtype, merged in float32) and its log-sum-exp."""
    top = torch.maximum(l1, l2)
    w1, w2 = (l1 - top).exp(), (l2 - top).exp()
    total = w1 + w2
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / total[..., None]
    return out.to(o1.dtype), top + total.log()


def _gather(t: Tensor, index: Tensor, n: int) -> Tensor:
    """t (heads, T, d) at the positions `index` (n segments of one length, one after another)
    -> (n, heads, L, d), a view of (n, L, heads, d): a position's heads are gathered together, one
    block of heads * d when t is the projections' own (T, heads, d) layout seen as (heads, T, d), as
    the model hands it over (several times faster than a gather along dim 1 of that view)."""
    return t.transpose(0, 1).index_select(0, index).unflatten(0, (n, -1)).transpose(1, 2)


def _scatter(dst: Tensor, index: Tensor, src: Tensor, add: bool = False) -> None:
    """Write (or add) src (n, heads, L, d) into dst (heads, T, d) at the positions `index`, the
    inverse of `_gather`: position by position along the (T, heads, d) layout."""
    rows = src.transpose(1, 2).reshape(-1, src.shape[1], src.shape[3])  # (n * L, heads, d)
    at = dst.transpose(0, 1)  # (T, heads, d)
    if add:
        at.index_add_(0, index, rows)
    else:
        at.index_copy_(0, index, rows)


def _position_major(t: Tensor) -> Tensor:
    """An uninitialised (heads, T, d) like t, laid out (T, heads, d) as the projections' outputs are."""
    return t.new_empty(t.shape[1], t.shape[0], t.shape[2]).transpose(0, 1)


class _SegmentsCPU(torch.autograd.Function):
    """Every segment of a packed row on CPU through torch's CPU flash kernel (what
    F.scaled_dot_product_attention runs there, GQA included) and its backward kernel, in two kinds
    of call (`VarlenLayout.cascade_calls`): each segment's queries over its own keys (causal), and a
    question's captions, all their queries in one run, over their prompt's keys, read once for the
    question rather than once per caption. A query's two results are merged by their log-sum-exps
    (softmax over [prompt; own] keys, to float rounding). The backward calls the kernel on each part
    with the merged output and log-sum-exp, which gives that part's share of the whole attention's
    gradients (as ring attention does); it keeps the packed row's q, k, v, output and log-sum-exps,
    and gathers the rest again.

    q (H, T, d), k and v (Hkv, T, d). -> (H, T, d)"""

    @staticmethod
    def forward(ctx, q, k, v, calls, scale):
        own, prefix = calls
        H, d = q.shape[0], q.shape[2]
        out = _position_major(q)  # every query is in exactly one own call
        lse = q.new_empty(q.shape[1], H, dtype=torch.float32)  # (T, H)
        for n, queries, keys in own:
            o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _gather(q, queries, n), _gather(k, keys, n), _gather(v, keys, n), 0.0, True, scale=scale)
            _scatter(out, queries, o)
            lse.index_copy_(0, queries, m.transpose(1, 2).reshape(-1, H))
        rows = out.transpose(0, 1)  # (T, H, d)
        for n, queries, keys in prefix:  # each query in one at most: merge it with its own keys' result
            o1, l1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _gather(q, queries, n), _gather(k, keys, n), _gather(v, keys, n), 0.0, False, scale=scale)
            o1 = o1.transpose(1, 2).reshape(-1, H, d)  # (n * Q, H, d), position by position
            l1 = l1.transpose(1, 2).reshape(-1, H)  # (n * Q, H)
            o, m = _merge(o1, l1, rows.index_select(0, queries), lse.index_select(0, queries))
            rows.index_copy_(0, queries, o)
            lse.index_copy_(0, queries, m)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.calls, ctx.scale = calls, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        H = q.shape[0]
        dq, dk, dv = (_position_major(t).zero_() for t in (q, k, v))
        own, prefix = ctx.calls
        for causal, calls in ((True, own), (False, prefix)):
            for n, queries, keys in calls:
                m = lse.index_select(0, queries).view(n, -1, H).transpose(1, 2).contiguous()  # (n, H, L)
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    _gather(grad, queries, n), _gather(q, queries, n), _gather(k, keys, n), _gather(v, keys, n),
                    _gather(out, queries, n), m, 0.0, causal, scale=ctx.scale)
                _scatter(dq, queries, gq, add=True)
                _scatter(dk, keys, gk, add=True)
                _scatter(dv, keys, gv, add=True)
        return dq, dk, dv, None, None


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attn_fn():
    """torch's varlen attention (torch >= 2.10; its kernels run on CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _torch_varlen(varlen_attn):
    """torch's `varlen_attn` behind flash_attn_varlen_func's signature: q (total_q, H, d), k and v
    (total_k, Hkv, d), int32 cu_seqlens; causal is window_size=(-1, 0), GQA needs enable_gqa; it has
    no dropout. None when torch has none."""
    if varlen_attn is None:
        return None

    def call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
             causal=False):
        if dropout_p:
            raise ValueError("torch's varlen_attn has no attention dropout")
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                           window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])
    return call



@dataclass
class SharedPrefix:
    """The keys and values of the first tokens every row of a batch starts with, one copy for all
    rows, layer by layer ((1, Hkv, P, d) each, as the model's KV cache holds them: after rotary).
    `prefix_attention` attends each row's queries to them and to the row's own keys.

    `last_query_layer`: a layer whose attention is wanted at each row's last position only (the
    last layer of a prefill that keeps the last position's logits alone): there it attends that
    position's query, and its other positions' outputs are zeros."""
    keys: list[Tensor]
    values: list[Tensor]
    last_query_layer: int | None = None
    _mask: tuple = (None, None)  # the last boolean mask seen and its additive form: one per forward, every layer

    def additive(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """`_additive(mask)`, made once for all the layers of a forward."""
        if self._mask[0] is not mask:
            self._mask = (mask, _additive(mask, dtype))
        return self._mask[1]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True where a query sees a key) as an additive one: 0 there, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attention_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor]:
    """SDPA's output (B, H, Lq, d) and each query's log-sum-exp of its scaled, masked scores
    (B, H, Lq) in float32. q (B, H, Lq, d), k and v (B, Hkv, Lk, d); mask additive, broadcast to
    (B, 1, Lq, Lk), or None; causal aligned at the top left (SDPA's is_causal). A query that sees
    no key (a pad's) gets a zero output, and a log-sum-exp of 0 on CPU (torch's flash kernel),
    -inf elsewhere: finite either way once merged with the prefix's."""
    if q.device.type == "cpu":  # the kernel F.scaled_dot_product_attention runs there, GQA included
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                          scale=scale)
    return _attention_lse_math(q, k, v, mask, causal, scale)


def _attention_lse_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
                        ) -> tuple[Tensor, Tensor]:
    """`_attention_lse` in plain torch ops (devices other than CPU): the scores in float32."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, Lq, Lk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask
    lse = s.logsumexp(dim=-1)
    p = (s - lse[..., None]).exp().nan_to_num(0.0)  # a row of -inf: 0, not nan
    return (p.to(v.dtype) @ v), lse


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix_k: Tensor, prefix_v: Tensor,
                     scale: float) -> Tensor:
    """Attention of rows that all start with the same P tokens, without a copy of those tokens'
    keys per row: each query attends the one shared copy (all of it: the prefix comes before every
    row's own tokens) and, apart, its row's own keys; the two are merged by their log-sum-exps,
    which is softmax over [prefix; own] keys to float rounding.

    q (B, H, L, d); k and v (B, Hkv, K, d), the rows' own keys (cached ones and these queries');
    mask: the own keys' mask as the model built it for SDPA or eager (bool, True = seen, or
    additive; (B, 1, L, K)), or None for causal (L > 1) or all seen (L == 1); prefix_k and
    prefix_v (1, Hkv, P, d). -> (B, L, H, d), as the model's attention functions return it.

    The prefix part is one call over B * L queries (the rows folded into the query axis under each
    key head), so a decode step reads the prefix's keys once, not once per row."""
    B, H, L, d = q.shape
    Hkv = prefix_k.shape[1]
    if mask is not None and mask.dtype == torch.bool:
        mask = _additive(mask, q.dtype)
    g = H // Hkv
    folded = q.view(B, Hkv, g, L, d).transpose(0, 1).reshape(1, Hkv, B * g * L, d)
    o1, l1 = _attention_lse(folded, prefix_k, prefix_v, None, False, scale)
    o1 = o1.view(Hkv, B, g, L, d).transpose(0, 1).reshape(B, H, L, d)
    l1 = l1.view(Hkv, B, g, L).transpose(0, 1).reshape(B, H, L)
    o2, l2 = _attention_lse(q, k, v, mask, mask is None and L > 1, scale)
    return _merge(o1, l1, o2, l2)[0].transpose(1, 2).contiguous()


def _dispatch(base: str, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
              packed_layout: VarlenLayout | None = None, shared_prefix: SharedPrefix | None = None, **kwargs):
    """The attention of a model with `enable_packed`: packed segments when a layout is passed,
    the rows' own keys after a shared prefix's when one is (`HFEngine`'s decode), the model's own
    implementation otherwise (generate, the padded forward)."""
    if shared_prefix is not None:
        i = module.layer_idx
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = shared_prefix.additive(attention_mask, query.dtype)
        if i == shared_prefix.last_query_layer and query.shape[2] > 1:
            out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # (B, L, H, d)
            out[:, -1:] = prefix_attention(query[:, :, -1:], key, value,
                                           None if attention_mask is None else attention_mask[..., -1:, :],
                                           shared_prefix.keys[i], shared_prefix.values[i], scaling)
            return out, None
        return prefix_attention(query, key, value, attention_mask, shared_prefix.keys[i], shared_prefix.values[i],
                                scaling), None
    if packed_layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        # eager is the modeling file's own function, not a registered one
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return varlen_attention(query, key, value, packed_layout, scaling, dropout if module.training else 0.0), None


def shares_prefix(model) -> bool:
    """Whether `prefix_attention` can stand in for `model`'s attention: every layer full attention
    (no sliding window) under SDPA or eager (whose masks it reads)."""
    text = model.model.config.get_text_config()
    base = (text._attn_implementation or "sdpa").removeprefix(PACKED_PREFIX)
    types = getattr(text, "layer_types", None) or ["full_attention"]
    return base in ("sdpa", "eager") and all(t == "full_attention" for t in types)


def enable_packed(model) -> None:
    """Route the language model's attention through `_dispatch` (registered as racro_packed_<impl>,
    with <impl>'s masks); the vision tower keeps its own. Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    text = model.model.config.get_text_config()  # model.config is the engine's own under DeepSpeed
    base = text._attn_implementation or "sdpa"
    if base.startswith(PACKED_PREFIX):
        return
    if base not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"model.attn_impl: the packed forward runs beside sdpa, eager or flash attention, not {base}")
    name = PACKED_PREFIX + base
    ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(_dispatch, base))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    text._attn_implementation = name


# ----------------------------------------------------------------------------- packing

def same_prompt(a, b) -> bool:
    return (a.prompt_len == b.prompt_len and a.pixel_values is b.pixel_values
            and a.input_ids[:a.prompt_len] == b.input_ids[:b.prompt_len])


def group_samples(samples) -> list[list[int]]:
    """Runs of consecutive samples with the same prompt (a question's captions), as index lists."""
    groups: list[list[int]] = []
    for i, s in enumerate(samples):
        if groups and same_prompt(samples[groups[-1][0]], s):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def packed_tokens(samples, group: list[int]) -> int:
    """Tokens a group adds to a packed row: its prompt once and each caption."""
    s0 = samples[group[0]]
    return s0.prompt_len + sum(len(samples[i].input_ids) - samples[i].prompt_len for i in group)


def token_budget_batches(samples, groups: list[list[int]], budget: int, max_samples: int) -> list[list[list[int]]]:
    """Micro-batches of whole groups: each filled up to `budget` packed tokens (0: no token budget)
    and `max_samples` captions (0: no count limit); a group beyond either goes alone."""
    out: list[list[list[int]]] = []
    tokens = count = 0
    for g in groups:
        n = packed_tokens(samples, g)
        if out and (not budget or tokens + n <= budget) and (not max_samples or count + len(g) <= max_samples):
            out[-1].append(g)
            tokens, count = tokens + n, count + len(g)
        else:
            out.append([g])
            tokens, count = n, len(g)
    return out


def split_batches(samples, batches: list[list[list[int]]], n: int) -> list[list[list[int]]]:
    """`batches` (micro-batches of groups) cut into exactly n >= len(batches) micro-batches, in order.

    Each cut halves the micro-batch of most packed tokens among those of two or more captions, where
    its halves' tokens come closest to even: between two of its groups, or within its one group
    (each half then computes the prompt). Under FSDP2 or ZeRO-3 every rank must run as many
    forwards as the others, or those with more wait forever in an all-gather the rest never join;
    a token budget gives ranks different counts, and this evens them out (`forward.micro_batches`).
    """
    def tokens(batch: list[list[int]]) -> int:
        return sum(packed_tokens(samples, g) for g in batch)

    out = [list(b) for b in batches]
    while len(out) < n:
        can = [i for i, b in enumerate(out) if sum(len(g) for g in b) > 1]
        if not can:
            raise ValueError(f"{sum(len(g) for b in out for g in b)} captions cannot fill {n} micro-batches")
        i = max(can, key=lambda j: tokens(out[j]))
        b = out[i]
        cuts = ([(b[:k], b[k:]) for k in range(1, len(b))] if len(b) > 1
                else [([b[0][:k]], [b[0][k:]]) for k in range(1, len(b[0]))])
        out[i:i + 1] = min(cuts, key=lambda c: max(tokens(c[0]), tokens(c[1])))
    return out


@dataclass
class PackedBatch:
    input_ids: Tensor  # (1, T)
    position_ids: Tensor  # (3, 1, T)
    layout: VarlenLayout
    images: dict  # image_embeds (image tokens, D), or pixel_values and image_grid_thw, in row order
    gather: Tensor  # (N,) packed positions whose hidden states predict the caption tokens
    targets: Tensor  # (N,)
    order: list[int]  # the samples' indices, in row order


def prompt_positions(model, ids: Tensor, grid: Tensor | None) -> Tensor:
    """(3, P) rotary positions of a prompt (1-D positions on all axes when it has no image)."""
    inner = model.model
    if grid is None:
        return torch.arange(ids.numel(), device=ids.device).expand(3, -1)
    pos, _ = inner.get_rope_index(ids[None], mm_token_types(ids[None], model.model.config), image_grid_thw=grid)
    return pos[:, 0]


def cached_image_features(model, samples, groups: list[list[int]]) -> None:
    """Store each group's image features (image tokens, D) on its samples, computed without grad in
    one vision call for the groups that have none yet: a frozen vision tower's, reused by every
    pass of the step."""
    need = [g for g in groups if samples[g[0]].pixel_values is not None and samples[g[0]].image_embeds is None]
    if not need:
        return
    dev = model.lm_head.weight.device
    pv = torch.cat([samples[g[0]].pixel_values for g in need]).to(dev)
    grid = torch.cat([samples[g[0]].image_grid_thw for g in need]).to(dev)
    with torch.no_grad():
        per_image = iter(model.model.get_image_features(pv, grid, return_dict=True).pooler_output)
    for g in need:
        feats = torch.cat([next(per_image) for _ in range(len(samples[g[0]].image_grid_thw))])
        for i in g:
            samples[i].image_embeds = feats


def pack(model, samples, groups: list[list[int]], device, cache_vision: bool) -> PackedBatch:
    """One packed row of `groups` (index lists into samples). cache_vision: the vision tower is frozen,
    so its features are computed once per step (`cached_image_features`); otherwise the images go
    through the tower inside the forward, once per question."""
    ids, pos, cu_q, cu_k, kv, gather, targets, order = [], [], [0], [0], [], [], [], []
    if cache_vision:
        cached_image_features(model, samples, groups)
    with_images = [samples[g[0]] for g in groups if samples[g[0]].pixel_values is not None]
    t = 0
    for g in groups:
        s0 = samples[g[0]]
        P = s0.prompt_len
        p_ids = torch.tensor(s0.input_ids[:P], device=device)
        p_pos = prompt_positions(model, p_ids, s0.image_grid_thw.to(device) if s0.image_grid_thw is not None else None)
        start = int(p_pos.max()) + 1 if P else 0
        ids.append(p_ids)
        pos.append(p_pos)
        prompt = torch.arange(t, t + P, device=device)
        kv.append(prompt)
        cu_q.append(t + P)
        cu_k.append(cu_k[-1] + P)
        last = t + P - 1  # the prompt's last token predicts each caption's first
        t += P
        for i in g:
            s = samples[i]
            cap = s.input_ids[P:]
            L = len(cap)
            ids.append(torch.tensor(cap, dtype=torch.long, device=device))
            pos.append((start + torch.arange(L, device=device)).expand(3, -1))
            kv.extend([prompt, torch.arange(t, t + L, device=device)])
            cu_q.append(t + L)
            cu_k.append(cu_k[-1] + P + L)
            if L:
                gather.append(torch.cat([torch.tensor([last], device=device), torch.arange(t, t + L - 1, device=device)]))
                targets.append(ids[-1])
            t += L
            order.append(i)
    images = {}
    if with_images and cache_vision:
        images["image_embeds"] = torch.cat([s.image_embeds for s in with_images])
    elif with_images:
        images["pixel_values"] = torch.cat([s.pixel_values for s in with_images]).to(device)
        images["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images]).to(device)
    return PackedBatch(
        input_ids=torch.cat(ids)[None], position_ids=torch.cat(pos, dim=1)[:, None],
        layout=VarlenLayout(cu_q, cu_k, torch.cat(kv)), images=images,
        gather=torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long, device=device),
        targets=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device),
        order=order)


def packed_hidden(model, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """The decoder's last hidden state at the positions that predict caption tokens, h (N, D), and
    those tokens, y (N,), sample by sample in `batch.order`."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    enable_packed(model)
    images = dict(batch.images)
    if "image_embeds" in images:
        images = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=(images["image_embeds"],))}}
    hidden = model.model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, **images,
        # no mask to build: the layout is the mask
        attention_mask={"full_attention": None, "sliding_attention": None},
        packed_layout=batch.layout, use_cache=False,
    ).last_hidden_state  # (1, T, D)
    return hidden[0].index_select(0, batch.gather), batch.targets
