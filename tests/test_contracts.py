"""GPU-only contracts held as state a CPU can check: vLLM's sleep mode, optimizer offload, the
reference's rotary buffers, and sampling seeds that never repeat across ranks and steps."""
from __future__ import annotations

import gc

import pytest
import torch

from racro_fast.engines import SleepContract, SleepContractError


class Owner:
    """Something that holds the process's sleep-mode slot (the engine does, as `contract`)."""

    def __init__(self, name: str) -> None:
        self.contract = SleepContract(name, self)


@pytest.fixture
def engine():
    owner = Owner("captioner")
    yield owner.contract
    owner.contract.release()


def test_training_order_is_allowed(engine):
    """What train.sync_weights and train.rollout do every step, twice."""
    engine.sleep(2)  # after construction, build_engines
    for _ in range(2):
        engine.wake_up(["weights"])
        engine.check_push()
        engine.wake_up(["kv_cache"])
        engine.check_generate()
        engine.sleep(2)
    assert engine.level == 2 and not engine.awake


def test_the_old_order_is_refused(engine):
    """sleep(2), push into discarded weights, then a plain wake_up: an illegal address on a GPU."""
    engine.sleep(2)
    with pytest.raises(SleepContractError, match=r"captioner.push_weights: the weights are asleep.*level 2"):
        engine.check_push()


def test_generate_on_discarded_weights_is_refused(engine):
    """Woken after level 2 without a push: the weights' memory holds garbage."""
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(SleepContractError, match="discarded by sleep\\(level=2\\)"):
        engine.check_generate()


def test_level_1_keeps_the_weights(engine):
    engine.sleep(1)
    with pytest.raises(SleepContractError, match=r"generate: \['kv_cache', 'weights'\] asleep"):
        engine.check_generate()
    engine.wake_up()
    engine.check_generate()


@pytest.mark.parametrize("calls, match", [
    ([("sleep", 3)], "level must be 1 or 2"),
    ([("sleep", 1), ("sleep", 2)], "already asleep"),
    ([("wake_up", ["weights"])], r"\['weights'\] already awake"),
    ([("sleep", 2), ("wake_up", ["vram"])], "unknown tags"),
])
def test_illegal_calls_name_call_and_state(engine, calls, match):
    with pytest.raises(SleepContractError, match=match) as err:
        for name, arg in calls:
            getattr(engine, name)(arg)
    assert str(err.value).startswith("captioner.") and "(state: level" in str(err.value)


def test_one_sleep_mode_engine_per_process(engine):
    with pytest.raises(SleepContractError, match="one sleep-mode engine per process and captioner is it"):
        Owner("reasoner")


def test_slot_frees_with_its_engine():
    first = Owner("first")
    del first
    gc.collect()
    second = Owner("second")  # the dead engine's slot is free
    second.contract.release()


def test_optimizer_offload_reload_round_trip():
    """Every state tensor, AdamW's `step` included, leaves for the host and comes back to the device
    it came from with its values: a `step` left on the host is a host pointer in a fused GPU kernel.

    A CPU has one device, so the host here is `meta` (shapes, no values): the offload must move every
    tensor there and record where each came from; the values that a real host copy would hold are
    then put back in its place, and the reload must return each to its recorded device unchanged."""
    from racro_fast.parallel import offload_optimizer, reload_optimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    before = {(id(st), k): v.clone() for st in opt.state.values() for k, v in st.items()}
    moved = offload_optimizer(opt, host=torch.device("meta"))
    assert sorted(k for _, k, _ in moved) == sorted(k for st in opt.state.values() for k in st)
    assert {k for _, k, _ in moved} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(v.device.type == "meta" for st in opt.state.values() for v in st.values())
    assert all(dev == torch.device("cpu") for _, _, dev in moved)
    for state, k, _ in moved:  # what the host copy holds
        state[k] = before[(id(state), k)].clone()
    records = list(moved)
    reload_optimizer(moved)
    assert not moved, "reload consumes its records"
    for state, k, dev in records:
        assert state[k].device == dev
        torch.testing.assert_close(state[k], before[(id(state), k)], rtol=0, atol=0)
    opt.step()


def test_reference_keeps_fp32_rotary_buffers(tiny_captioner_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from racro_fast.parallel import cast_params
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_captioner_dir), dtype=torch.float32)
    inv = {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert inv and all(b.dtype == torch.float32 for b in inv.values())
    cast_params(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    bad = [n for n, b in model.named_buffers() if n.endswith("inv_freq") and b.dtype != torch.float32]
    assert not bad, f"rotary buffers rounded to bf16: {bad}"


def test_rollout_seeds_never_collide(monkeypatch):
    """Captions and answers of every rank and step draw from disjoint seed ranges."""
    from racro_fast import dist
    from racro_fast.config import Config
    from racro_fast.train import rollout_seed
    cfg = Config()
    Q, G, k, world = 3, 4, 2, 4
    span = Q * G * (1 + k)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    used: set[int] = set()
    for step in range(5):
        for rank in range(world):
            monkeypatch.setattr(dist, "rank", lambda r=rank: r)
            base = rollout_seed(cfg, step, span)
            # captioner: request i, sample g -> base + i*G + g; reasoner: base + Q*G + j*k + s
            seeds = {base + i * G + g for i in range(Q) for g in range(G)}
            seeds |= {base + Q * G + j * k + s for j in range(Q * G) for s in range(k)}
            assert len(seeds) == span and not seeds & used, (step, rank)
            used |= seeds


def test_shutdown_ends_the_process_group(monkeypatch):
    """A finished run destroys its process group before the interpreter exits (gloo's threads abort
    the teardown otherwise): every entry point's wrapper (run_main) does it when the entry point
    returns; in a plain process there is nothing to do."""
    import socket

    import torch.distributed as tdist

    from racro_fast import dist
    from racro_fast.config import run_main
    dist.shutdown()  # no group: nothing to do
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    dist.init(timeout_s=60)
    try:
        assert dist.is_dist() and dist.all_reduce_sum([2.0]) == [2.0]
        dist.shutdown()
        assert not dist.is_dist() and not tdist.is_initialized()

        def entry_point(argv):  # as `racro-fast train` under torchrun: train() makes the group
            dist.init(timeout_s=60)
            return 0 if dist.all_reduce_sum([1.0]) == [1.0] else 1

        assert run_main(entry_point, []) == 0
        assert not dist.is_dist() and not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
