"""The packed policy forward (packed.py) against the padded one (one row per caption).

A question's prompt and images are computed once and its captions attend to them; the log-probs and
every parameter's gradient must equal the padded forward's, for one and several images per
question, captions of different lengths (empty included) and G = 1..8. FSDP2 / DeepSpeed on 2 ranks
run the packed forward in tests/test_dist.py.
"""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from conftest import assert_close
from racro_fast.forward import ForwardPlan, Sample, caption_batches, caption_mask, fill_logprobs
from racro_fast.packed import (enable_packed, group_samples, pack, packed_tokens, same_prompt, split_batches,
                               token_budget_batches)
from racro_fast.parallel import Single
from racro_fast.prompts import build_captioner_inputs, captioner_messages, mm_token_types
from racro_fast.synth import make_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_captioner_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    tok = AutoTokenizer.from_pretrained(str(tiny_captioner_dir))
    proc = Qwen2VLImageProcessor.from_pretrained(str(tiny_captioner_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir), dtype=torch.float32)
    return model.train(), tok, proc


def make_samples(tok, proc, images_per_question: list[int], G: int, seed: int = 0) -> list[Sample]:
    """Questions with 0..n images, G captions each of lengths 0, 1, ... (random tokens)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for q, n_img in enumerate(images_per_question):
        row = make_rows("count", 1, seed=q + 1)[0]
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        cap = build_captioner_inputs(tok, proc, captioner_messages(row["problem"], n_img), [image] * n_img)
        pv = cap.pixel_values if n_img else None
        grid = cap.image_grid_thw if n_img else None
        for i in range(G):
            L = (i * 5 + q) % 13  # 0 for the first caption of the first question
            caption = torch.randint(20, 200, (L,), generator=g).tolist()
            samples.append(Sample(cap.prompt_ids + caption, len(cap.prompt_ids), pv, grid,
                                  adv=float(torch.randn((), generator=g))))
    return samples


def logprobs_and_grads(model, samples, plan: ForwardPlan, pad_id: int):
    """Per-token log-probs (sample order) and every parameter's gradient of sum(w * logp)."""
    model.zero_grad(set_to_none=True)
    out = []
    for mb, h, y in caption_batches(model, samples, pad_id, CPU, plan):
        logp = torch.log_softmax(h @ model.lm_head.weight.T, dim=-1).gather(1, y[:, None])[:, 0]
        w = torch.cat([torch.full((len(s.input_ids) - s.prompt_len,), s.adv) for s in mb])
        (logp * w).sum().backward()
        out.append(logp.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(out), grads


@pytest.mark.parametrize("images,G,checkpointing", [([1], 1, False), ([1, 2], 3, False), ([2, 0, 1], 8, False),
                                                    ([1, 2], 4, True)])
def test_packed_equals_padded(tiny, images, G, checkpointing):
    """checkpointing: the decoder layers recomputed in the backward take the packed path again."""
    model, tok, proc = tiny
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = make_samples(tok, proc, images, G)
    padded, g_pad = logprobs_and_grads(model, samples, ForwardPlan(packed=False, micro_batch=4), tok.pad_token_id)
    packed, g_pack = logprobs_and_grads(model, samples, ForwardPlan(packed=True, micro_batch=G), tok.pad_token_id)
    model.gradient_checkpointing_disable()
    assert packed.shape == padded.shape
    assert_close(packed, padded, 1e-5, "log-probs")
    assert g_pack.keys() == g_pad.keys()
    assert any(k.startswith("model.visual") for k in g_pack)
    for k in g_pad:
        scale = g_pad[k].abs().max().clamp_min(1e-6)
        assert_close(g_pack[k] / scale, g_pad[k] / scale, 1e-4, k)


def test_packed_positions_are_the_full_rows(tiny):
    """A caption's 3-D positions continue its prompt's exactly as in a full [prompt; caption] row."""
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [2, 1], G=3)
    groups = group_samples(samples)
    assert groups == [[0, 1, 2], [3, 4, 5]]
    batch = pack(model, samples, groups, CPU, cache_vision=False)
    cu = batch.layout.cu_q
    # flash-attn's arguments: segment boundaries of queries and gathered keys, the longest of each
    cu_q, cu_k, max_q, max_k = batch.layout.flash_args(CPU)
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.tolist() == cu and int(cu_q[-1]) == batch.input_ids.shape[1]
    P0 = samples[0].prompt_len
    assert max_q == max(P0, samples[3].prompt_len)
    assert max_k == max(len(s.input_ids) for s in samples)  # a caption attends to its prompt and itself
    assert int(cu_k[-1]) == batch.layout.kv_index.numel()
    seg = 0
    for g in groups:
        prompt_pos = batch.position_ids[:, 0, cu[seg]:cu[seg + 1]]
        seg += 1
        for i in g:
            s = samples[i]
            ids = torch.tensor(s.input_ids)[None]
            full, _ = model.model.get_rope_index(ids, mm_token_types(ids, model.config), image_grid_thw=s.image_grid_thw)
            got = torch.cat([prompt_pos, batch.position_ids[:, 0, cu[seg]:cu[seg + 1]]], dim=1)
            assert torch.equal(got, full[:, 0]), i
            seg += 1


def test_frozen_vision_runs_once_per_step(tiny):
    """With the vision tower frozen, the old, reference and update passes share one vision call per
    question; the log-probs equal the padded forward's."""
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 2], G=4)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: calls.append(int(args[0].shape[0])))
    try:
        model.model.visual.requires_grad_(False)
        plan = ForwardPlan(packed=True, micro_batch=4, cache_vision=True)
        fill_logprobs(Single(None), model, samples, "old_logp", 1.0, tok.pad_token_id, CPU, plan)
        fill_logprobs(Single(None), model, samples, "ref_logp", 1.0, tok.pad_token_id, CPU, plan)
        packed, _ = logprobs_and_grads(model, samples, plan, tok.pad_token_id)
        patches = sum(int(samples[g[0]].pixel_values.shape[0]) for g in group_samples(samples))
        assert sum(calls) == patches, (calls, patches)  # each question's patches once, over three passes
        calls.clear()
        padded, _ = logprobs_and_grads(model, samples, ForwardPlan(packed=False, micro_batch=8), tok.pad_token_id)
        assert sum(calls) == 4 * patches  # the padded forward encodes every caption's images
    finally:
        hook.remove()
        model.model.visual.requires_grad_(True)
    assert_close(packed, padded, 1e-5, "log-probs")
    old = torch.cat([s.old_logp[s.prompt_len - 1:] for s in samples])
    assert_close(old, packed, 1e-5, "old log-probs")


def test_vision_runs_once_per_question_in_each_forward(tiny):
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 2, 1], G=4)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: calls.append(int(args[0].shape[0])))
    try:
        logprobs_and_grads(model, samples, ForwardPlan(packed=True, micro_batch=8), tok.pad_token_id)
    finally:
        hook.remove()
    groups = group_samples(samples)
    assert len(calls) == 2  # micro-batches of two questions, then one
    assert sum(calls) == sum(int(samples[g[0]].pixel_values.shape[0]) for g in groups)


def test_token_budget_keeps_groups_whole(tiny):
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 1, 1, 1], G=3)
    groups = group_samples(samples)
    per_group = [samples[g[0]].prompt_len + sum(len(samples[i].input_ids) - samples[i].prompt_len for i in g)
                 for g in groups]
    budget = per_group[0] + per_group[1]
    batches = token_budget_batches(samples, groups, budget, 0)
    assert [len(b) for b in batches][0] == 2
    assert [i for b in batches for g in b for i in g] == list(range(len(samples)))
    for b in batches:
        assert len(b) == 1 or sum(per_group[groups.index(g)] for g in b) <= budget
    assert token_budget_batches(samples, groups, 1, 0) == [[g] for g in groups]  # each group alone
    assert token_budget_batches(samples, groups, 0, 6) == [groups[:2], groups[2:]]


def test_split_batches_cuts_the_heaviest_in_order(tiny):
    """Cut to exactly n micro-batches: between groups where a micro-batch has several, within its
    group where it has one, every sample once and in order; fewer captions than n is an error."""
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 1, 1], G=3)  # captions of 0..12 tokens
    groups = group_samples(samples)
    whole = [groups]  # one micro-batch of the three questions
    assert split_batches(samples, whole, 1) == whole
    for n in range(2, len(samples) + 1):
        out = split_batches(samples, whole, n)
        assert len(out) == n and all(out)
        assert [i for b in out for g in b for i in g] == list(range(len(samples)))
        # a group is never mixed with another question's samples
        assert all(same_prompt(samples[g[0]], samples[i]) for b in out for g in b for i in g)
    two = split_batches(samples, whole, 2)
    tokens = lambda b: sum(packed_tokens(samples, g) for g in b)  # noqa: E731
    best = min(max(tokens(groups[:k]), tokens(groups[k:])) for k in (1, 2))
    assert max(tokens(b) for b in two) == best, "the cut is not the most even one between groups"
    # one micro-batch per question, cut to 4: the heaviest question's captions are halved
    per_question = [[g] for g in groups]
    four = split_batches(samples, per_question, 4)
    heaviest = max(range(3), key=lambda q: tokens(per_question[q]))
    assert [len(b) for b in four].count(1) == 4 and sum(len(b[0]) for b in four) == 9
    assert [i for b in four for g in b for i in g] == list(range(9))
    assert sum(1 for b in four if set(b[0]) <= set(groups[heaviest])) == 2
    with pytest.raises(ValueError, match="9 captions cannot fill 10 micro-batches"):
        split_batches(samples, whole, 10)


def test_mask_matches_the_token_order(tiny):
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 1], G=3)
    for mb, h, y in caption_batches(model, samples, tok.pad_token_id, CPU, ForwardPlan(micro_batch=6)):
        mask = caption_mask(mb, CPU)
        assert int(mask.sum()) == h.shape[0] == y.shape[0]
        expect = torch.cat([torch.tensor(s.input_ids[s.prompt_len:], dtype=torch.long) for s in mb])
        assert torch.equal(y, expect)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_enable_packed_leaves_the_padded_forward_and_generate_alone(tiny_captioner_dir, tiny, impl):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, tok, proc = tiny
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir), dtype=torch.float32,
                                                               attn_implementation=impl).eval()
    samples = make_samples(tok, proc, [1, 2], G=2)
    plan = ForwardPlan(packed=False, micro_batch=4)
    with torch.no_grad():
        before = torch.cat([h for _, h, _ in caption_batches(plain, samples, tok.pad_token_id, CPU, plan)])
        enable_packed(plain)
        enable_packed(plain)  # idempotent
        assert plain.config.text_config._attn_implementation == f"racro_packed_{impl}"
        assert plain.config.vision_config._attn_implementation == impl
        after = torch.cat([h for _, h, _ in caption_batches(plain, samples, tok.pad_token_id, CPU, plan)])
    assert torch.equal(before, after)
    from racro_fast.engines import GenRequest, HFEngine, SamplingConfig
    s = samples[0]
    req = GenRequest(prompt_ids=s.input_ids[:s.prompt_len], pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw)
    out = HFEngine(plain, tok).generate([req], SamplingConfig(n=1, temperature=0.0, max_tokens=4))
    assert len(out[0][0].token_ids) >= 1


@pytest.mark.parametrize("overrides", [["train.micro_batch_tokens=1"], ["train.packed=false", "train.micro_batch=3"]])
def test_update_is_the_same_whatever_the_micro_batches(tiny_captioner_dir, tiny, overrides):
    """One policy_update over the whole batch in one packed micro-batch == over one question per
    micro-batch (a token budget below every question) == padded rows: the loss normalisation does
    not depend on how the samples are split."""
    from pathlib import Path

    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast.config import load_config
    from racro_fast.train import policy_update
    _, tok, proc = tiny
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
    results = []
    for extra in (["train.micro_batch=64"], overrides):
        cfg = load_config(demo, ["loss.kl_coef=0", "loss.entropy_coef=0.01", "loss.loss_agg=seq-mean-token-mean", *extra])
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir), dtype=torch.float32).train()
        samples = make_samples(tok, proc, [1, 2, 1], G=3, seed=5)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        out = policy_update(Single(cfg), model, opt, samples, cfg, tok.pad_token_id, CPU, ForwardPlan.from_config(cfg))
        results.append((out, {k: v.clone() for k, v in model.state_dict().items()}))
    (a, wa), (b, wb) = results
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for k in wa:  # SGD at lr 1: the weights moved by the gradients themselves
        assert_close(wb[k], wa[k], 1e-5, k)


def flash_attn_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract as its docstring states it, in plain torch: q (total_q, H, d),
    k and v (total_k, Hkv, d), segments cut by the int32 cu_seqlens; query head h reads KV head
    h // (H / Hkv); with causal, the mask is aligned to the bottom right of each segment's matrix."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and dropout_p == 0.0 and causal
    H, Hkv = q.shape[1], k.shape[1]
    out = torch.empty(q.shape[0], H, v.shape[2], dtype=q.dtype)
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
        for h in range(H):
            kv = h // (H // Hkv)
            s = q[q0:q1, h] @ k[k0:k1, kv].T * softmax_scale  # (Lq, Lk)
            rows, cols = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None]
            s = s.masked_fill(cols > rows + (k1 - k0) - (q1 - q0), float("-inf"))
            out[q0:q1, h] = s.softmax(-1) @ v[k0:k1, kv]
    return out


def torch_varlen_attn_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                                window_size=(-1, -1), enable_gqa=False, **unused):
    """torch.nn.attention.varlen.varlen_attn's contract as its docstring states it, in plain torch:
    (T_q, H_q, D) / (T_k, H_kv, D) packed, cut by cu_seq; window_size (-1, 0) is causal; H_kv < H_q
    only with enable_gqa, each KV head shared by H_q / H_kv query heads. Its kernel is FlashAttention
    2's, whose causal mask is aligned at the bottom right (the GPU check runs the real one)."""
    assert not unused, unused
    assert window_size in ((-1, 0), (-1, -1))
    if query.shape[1] != key.shape[1]:
        assert enable_gqa, "GQA heads without enable_gqa: varlen_attn raises"
    return flash_attn_varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                       softmax_scale=scale, causal=window_size == (-1, 0))


@pytest.mark.parametrize("call", ["flash_attn", "torch_varlen_attn"])
def test_varlen_call_matches_the_segment_loop(tiny, call):
    """The arguments the CUDA path hands its varlen call (shapes, cu_seqlens, gathered keys, causal
    alignment, GQA, scale) run through a plain-torch rendering of the call's documented contract give
    the output of the SDPA segment loop that the CPU forward uses: flash-attn's flash_attn_varlen_func,
    and, where flash-attn is absent, torch's varlen_attn (causal as a window, the GQA flag), which the
    torch installed here has with those keywords."""
    import inspect

    from racro_fast.packed import _torch_varlen, varlen_attention, varlen_attn_fn
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 2], G=3)
    layout = pack(model, samples, group_samples(samples), CPU, cache_vision=False).layout
    T, H, Hkv, d = int(layout.cu_q[-1]), 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, T, d, generator=g) for n in (H, Hkv, Hkv))
    loop = varlen_attention(q, k, v, layout, scale=d ** -0.5)
    flash = flash_attn_varlen_reference if call == "flash_attn" else _torch_varlen(torch_varlen_attn_reference)
    varlen = varlen_attention(q, k, v, layout, scale=d ** -0.5, flash=flash)
    assert loop.shape == varlen.shape == (1, T, H, d)
    assert_close(varlen, loop, 1e-5, "attention output")
    if call == "torch_varlen_attn":
        real = varlen_attn_fn()
        assert real is not None, "torch >= 2.10 ships torch.nn.attention.varlen.varlen_attn"
        assert {"scale", "window_size", "enable_gqa"} <= set(inspect.signature(real).parameters)


def test_cpu_attention_is_sdpa_without_keeping_the_gathered_keys(tiny):
    """On CPU the segments go through torch's CPU flash kernel (what SDPA runs there) and its
    backward, a question's captions over their prompt's keys in one run and each segment over its
    own keys, merged: output and gradients equal SDPA on each segment's gathered keys within float
    rounding, GQA included; and nothing the backward keeps has the gathered keys' shape (the
    prompt's keys once per caption), only the packed row's keys and values."""
    from racro_fast.packed import varlen_attention
    model, tok, proc = tiny
    samples = make_samples(tok, proc, [1, 2], G=4)
    layout = pack(model, samples, group_samples(samples), CPU, cache_vision=False).layout
    T, H, Hkv, d = int(layout.cu_q[-1]), 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, T, d, generator=g, requires_grad=True) for n in (H, Hkv, Hkv))
    w = torch.randn(1, T, H, d, generator=g)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = varlen_attention(q, k, v, layout, scale=d ** -0.5)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert not [s for s in saved if len(s) == 4 and s[1] == Hkv], f"gathered keys kept for the backward: {saved}"
    assert (Hkv, T, d) in saved

    ref = []
    for i in range(len(layout.cu_q) - 1):  # one SDPA call per segment on its gathered keys
        lo, hi = layout.cu_q[i], layout.cu_q[i + 1]
        if hi == lo:
            continue
        keys = layout.kv_index[layout.cu_k[i]:layout.cu_k[i + 1]]
        lk, lq = len(keys), hi - lo
        mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, lo:hi], k[:, :, keys], v[:, :, keys], attn_mask=mask, is_causal=mask is None, scale=d ** -0.5,
            enable_gqa=True))
    ref = torch.cat(ref, dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert_close(out, ref, 1e-6, "output")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, 1e-6, f"d{name}")
    # the grouped SDPA path (attention dropout, devices without a kernel of their own) on the same
    # segments; a dropout of 1e-12 takes it and drops nothing
    from racro_fast.packed import _segments_by_shape
    assert_close(_segments_by_shape(q, k, v, layout, d ** -0.5, 1e-12, gqa=True), ref, 1e-6, "grouped SDPA output")


@pytest.mark.parametrize("path", ["cpu", "math"])
@pytest.mark.parametrize("case", ["prefill", "padded prefill", "decode", "padded decode"])
def test_prefix_attention_is_attention_over_prefix_and_own_keys(path, case, monkeypatch):
    """Rows that start with the same P tokens: attending the one shared copy of their keys and,
    apart, each row's own keys, merged by log-sum-exp, is SDPA over [prefix; own] keys (GQA, left
    padding, causal prefill, one-token decode), on CPU's flash kernel and on the plain-torch path
    of other devices; a pad's query, which sees no own key, still gets a finite output."""
    from racro_fast import packed
    from racro_fast.packed import prefix_attention
    if path == "math":  # the path of devices other than CPU, run here on CPU tensors
        monkeypatch.setattr(packed, "_attention_lse", packed._attention_lse_math)
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, d, P = 3, 4, 2, 16, 7
    L, K = (6, 6) if "prefill" in case else (1, 9)  # queries; own keys (cached ones and the queries')
    q = torch.randn(B, H, L, d, generator=g)
    k, v = torch.randn(B, Hkv, K, d, generator=g), torch.randn(B, Hkv, K, d, generator=g)
    pk, pv = torch.randn(1, Hkv, P, d, generator=g), torch.randn(1, Hkv, P, d, generator=g)
    sees = torch.ones(L, K, dtype=torch.bool).tril(K - L).expand(B, 1, L, K).clone()  # (B, 1, L, K)
    pads = [0, 2, 4] if "padded" in case else [0, 0, 0]
    for b, n in enumerate(pads):
        sees[b, :, :, :n] = False  # left pads: no query sees them
    mask = sees if "padded" in case else None
    out = prefix_attention(q, k, v, mask, pk, pv, d ** -0.5)  # (B, L, H, d)

    full_k, full_v = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2), torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    full_mask = torch.cat([torch.ones(B, 1, L, P, dtype=torch.bool), sees], dim=-1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask, scale=d ** -0.5,
                                                           enable_gqa=True).transpose(1, 2)
    real = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        real[b, :max(0, n - (K - L))] = False  # a pad's query (prefill) sees no own key
    assert out.shape == ref.shape
    assert_close(out[real], ref[real], 1e-5, case)
    assert torch.isfinite(out).all(), "a pad query's output is not finite"
