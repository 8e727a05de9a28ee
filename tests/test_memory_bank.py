"""LFUMemoryBank: eviction order and the capacity invariant against a shadow model under
random add/read sequences (hypothesis), usage counters against the float64 oracle, the
released-AMM mode, and bad input."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from vos_kernels import LFUMemoryBank


class Shadow:
    """Plain-Python model of the bank: entries in insertion order with (uid, birth, usage)."""

    def __init__(self, capacity, mode, protect_first):
        self.capacity, self.mode, self.protect_first = capacity, mode, protect_first
        self.entries = []           # [uid, birth, usage, key]
        self.first = None

    def add(self, keys, frame):
        need = len(self.entries) + len(keys) - self.capacity
        if need > 0:
            def score(e):
                if self.protect_first and e[1] == self.first:
                    return math.inf
                return e[2] / max(frame - e[1], 1)
            ranked = sorted(range(len(self.entries)), key=lambda i: (score(self.entries[i]), self.entries[i][1], i))
            if self.mode == "log_hits":
                t = 1
                while sum(score(e) < t for e in self.entries) < need:
                    t += 1
                drop = {i for i, e in enumerate(self.entries) if score(e) < t}
            else:
                drop = set(ranked[:need])
            self.entries = [e for i, e in enumerate(self.entries) if i not in drop]
        if self.first is None:
            self.first = frame
        for uid, key in keys:
            self.entries.append([uid, frame, 0.0, key])

    def read(self, q, k):
        m = torch.stack([e[3] for e in self.entries]).unsqueeze(0)
        _, _, _, hits, wsum = oracle.topk_read(q, m, torch.zeros(1, m.shape[1], 1), k, 1 / math.sqrt(m.shape[2]))
        for i, e in enumerate(self.entries):
            h = float(hits[0, i])
            if self.mode == "hits":
                e[2] += h
            elif self.mode == "weights":
                e[2] += float(wsum[0, i])
            elif h > 0:
                e[2] = min(max(e[2] + math.log(h), 0.0), 1e5)


def bank_state(bank):
    n = bank.size
    return bank.values[0, :n, 0].round().long().tolist(), bank.usage[0, :n].double()


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 6), st.integers(0, 2)),
    st.tuples(st.just("read"), st.integers(1, 12), st.integers(1, 8))), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, capacity=st.integers(6, 16), mode=st.sampled_from(["hits", "weights", "log_hits"]),
       protect_first=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_sequences_match_the_shadow_model(ops, capacity, mode, protect_first, seed):
    gen = torch.Generator().manual_seed(seed)
    bank = LFUMemoryBank(capacity, 4, 1, usage_mode=mode, protect_first=protect_first, dtype=torch.float64)
    shadow = Shadow(capacity, mode, protect_first)
    frame, uid = 0, 0
    for op in ops:
        if op[0] == "add":
            n, step = op[1], op[2]
            frame += step
            keys = torch.randn(n, 4, generator=gen, dtype=torch.float64)
            uids = list(range(uid, uid + n))
            uid += n
            values = torch.tensor(uids, dtype=torch.float64).view(1, n, 1)
            fits = not (protect_first and shadow.first is not None and
                        sum(e[1] == shadow.first for e in shadow.entries) + n > capacity)
            if not fits:
                before = bank_state(bank)
                with pytest.raises(ValueError, match="capacity"):
                    bank.add(keys.unsqueeze(0), values, frame)
                assert bank_state(bank)[0] == before[0]
                continue
            bank.add(keys.unsqueeze(0), values, frame)
            shadow.add(list(zip(uids, keys)), frame)
        else:
            if not shadow.entries:
                with pytest.raises(ValueError, match="empty"):
                    bank.read(torch.randn(1, op[1], 4, dtype=torch.float64), op[2])
                continue
            q = torch.randn(1, op[1], 4, generator=gen, dtype=torch.float64)
            bank.read(q, op[2])
            shadow.read(q, op[2])
        assert bank.size <= capacity
        uids_in_bank, usage = bank_state(bank)
        assert uids_in_bank == [e[0] for e in shadow.entries]
        torch.testing.assert_close(usage, torch.tensor([e[2] for e in shadow.entries], dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)


def test_batched_bank_evicts_per_element(gen):
    bank = LFUMemoryBank(8, 4, 2, batch_size=2)
    for f in range(5):
        bank.add(torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 2, generator=gen), f)
        bank.read(torch.randn(2, 10, 4, generator=gen), 3)
        assert bank.size <= 8
    keys, values = bank.memory()
    assert keys.shape == (2, bank.size, 4) and values.shape == (2, bank.size, 2)


def test_protect_first_keeps_the_first_frame(gen):
    bank = LFUMemoryBank(12, 4, 1, protect_first=True)
    first = torch.randn(1, 4, 4, generator=gen)
    bank.add(first, torch.zeros(1, 4, 1), 0)
    for f in range(1, 20):
        bank.add(torch.randn(1, 4, 4, generator=gen), torch.full((1, 4, 1), float(f)), f)
        bank.read(torch.randn(1, 6, 4, generator=gen) + 5, 2)    # queries far from frame 0
    assert torch.equal(bank.keys[0, :4], first[0]) and (bank.birth[0, :4] == 0).all()


def test_capacity_smaller_than_a_frame_raises_and_changes_nothing(gen):
    bank = LFUMemoryBank(5, 4, 1)
    bank.add(torch.randn(1, 3, 4), torch.zeros(1, 3, 1), 0)
    usage = bank.usage.clone()
    with pytest.raises(ValueError, match="^capacity:"):
        bank.add(torch.randn(1, 6, 4), torch.zeros(1, 6, 1), 1)
    assert bank.size == 3 and torch.equal(bank.usage, usage) and bank.frame == 0


@pytest.mark.parametrize("bad", [
    ("keys", lambda b: b.add(torch.randn(1, 3, 5), torch.zeros(1, 3, 1), 1)),
    ("values", lambda b: b.add(torch.randn(1, 3, 4), torch.zeros(1, 2, 1), 1)),
    ("keys", lambda b: b.add(torch.randn(1, 3, 4, dtype=torch.float64), torch.zeros(1, 3, 1), 1)),
    ("frame", lambda b: b.add(torch.randn(1, 3, 4), torch.zeros(1, 3, 1), -1)),
    ("k", lambda b: b.read(torch.randn(1, 3, 4), 0)),
])
def test_bad_input(bad):
    name, call = bad
    bank = LFUMemoryBank(10, 4, 1)
    bank.add(torch.randn(1, 3, 4), torch.zeros(1, 3, 1), 0)
    with pytest.raises(ValueError, match=f"^{name}:"):
        call(bank)
    assert bank.size == 3


def test_constructor_errors():
    for kwargs, name in ((dict(capacity=0), "capacity"), (dict(usage_mode="lru"), "usage_mode"),
                         (dict(key_dim=0), "key_dim")):
        args = dict(capacity=4, key_dim=4, value_dim=1)
        args.update(kwargs)
        with pytest.raises(ValueError, match=f"^{name}:"):
            LFUMemoryBank(**args)
