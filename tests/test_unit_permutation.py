"""acctrain.permutation against independent references.

The Feistel order is re-implemented here from the module's docstring in plain Python integers (splitmix64
round keys, six rounds of `R, L ^ mix(R + key) & mask` on 2h bits, cycle-walking below n), its round keys
checked against splitmix64's published outputs, and compared position by position with the module's numpy
version. The randperm order is torch.randperm's. tests/test_data_plan.py measures how well they shuffle.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from acctrain.permutation import EAGER_MAX, EagerPermutation, FeistelPermutation, kind, permutation

M64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    """splitmix64's finaliser, in Python integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64(seed: int, count: int) -> list[int]:
    state, out = seed % 2**64, []
    for _ in range(count):
        state = (state + GOLDEN) & M64
        out.append(mix(state))
    return out


class Reference:
    """The documented Feistel order, one position at a time."""

    def __init__(self, n: int, seed: int):
        self.n, self.keys = n, splitmix64(seed, 6)  # six rounds
        self.half = next(h for h in itertools.count(1) if 4**h >= n)  # the smallest even bit count 2h, h >= 1
        self.mask = (1 << self.half) - 1

    def feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (mix((right + key) & M64) & self.mask)
        return (left << self.half) | right

    def at(self, position: int) -> int:
        value = self.feistel(position)
        while value >= self.n:  # cycle-walking
            value = self.feistel(value)
        return value


def test_the_round_keys_are_splitmix64s_published_outputs():
    """The first outputs of splitmix64 seeded with 0 and with 1234567 (the generator's reference test vectors)."""
    assert splitmix64(0, 4) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert splitmix64(1234567, 3) == [0x599ED017FB08FC85, 0x2C73F08458540FA5, 0x883EBCE5A3F27C77]
    for seed in (0, 1234567, 2**64 - 1):
        assert [int(k) for k in FeistelPermutation(100, seed).keys] == splitmix64(seed, 6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000, 4096, 4097])
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3])
def test_every_position_is_the_references(n, seed):
    ours, ref = FeistelPermutation(n, seed), Reference(n, seed)
    assert ours.half == ref.half
    values = ours.take(0, n)
    assert values == [ref.at(p) for p in range(n)]
    assert sorted(values) == list(range(n))  # a permutation


def test_far_positions_of_a_huge_order_are_the_references():
    n, seed = 3 * 10**12 + 7, 99
    ours, ref = FeistelPermutation(n, seed), Reference(n, seed)
    positions = [0, 1, 2, 10**9, 2**40, n - 2, n - 1]
    got = ours.at(np.array(positions, dtype=np.uint64)).tolist()
    assert got == [ref.at(p) for p in positions] and all(0 <= v < n for v in got) and len(set(got)) == len(got)
    assert ours.take(n - 3, n + 5) == [ref.at(p) for p in (n - 3, n - 2, n - 1)]  # clipped at n


def test_the_network_itself_is_a_bijection_on_its_2h_bits():
    """Cycle-walking relies on it: the raw Feistel map, before values >= n are walked on, permutes [0, 4**h)."""
    for n in (5, 17, 200, 1025):
        perm = FeistelPermutation(n, seed=7)
        domain = 4**perm.half
        assert domain >= n and (n < 2 or domain < 4 * n)
        raw = perm._feistel(np.arange(domain, dtype=np.uint64)).tolist()
        assert sorted(raw) == list(range(domain))


def test_half_is_the_smallest_with_room_for_n():
    for n in range(1, 5000):
        half = FeistelPermutation(n, 0).half
        assert 4**half >= n and (half == 1 or 4 ** (half - 1) < n), n


def test_windows_are_slices_of_one_order_in_any_order_of_asking():
    n = 1000
    perm, whole = FeistelPermutation(n, 3), FeistelPermutation(n, 3).take(0, n)
    rng = random.Random(0)
    edges = [(-3, 4), (-10, -2), (n - 2, n + 10), (n, n + 3), (5, 5), (7, 3), (0, n)]
    for start, stop in edges + [(s, s + rng.randrange(0, 70)) for s in rng.sample(range(n), 50)]:
        assert perm.take(start, stop) == whole[max(start, 0):max(min(stop, n), 0)], (start, stop)
    positions = np.array(rng.sample(range(n), 40), dtype=np.uint64)
    assert perm.at(positions).tolist() == [whole[p] for p in positions.tolist()]


def test_the_order_is_a_function_of_the_seed():
    n = 5000
    same = FeistelPermutation(n, 11).take(0, n)
    assert FeistelPermutation(n, 11).take(0, n) == same
    assert FeistelPermutation(n, 11 + 2**64).take(0, n) == same  # the seed is taken modulo 2**64
    others = [FeistelPermutation(n, s).take(0, n) for s in (12, 13, 2**63)]
    for other in others:  # another seed: another order, not a shift or a few swaps of this one
        assert sum(a == b for a, b in zip(same, other)) < 20
    assert EagerPermutation(n, 11).take(0, n) != EagerPermutation(n, 12).take(0, n)


def test_the_eager_order_is_randperms_and_made_once():
    for n, seed in ((1, 0), (10, 5), (3000, 2**31)):
        perm = EagerPermutation(n, seed)
        want = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        assert perm.take(0, n) == want
        assert perm.take(3, 7) == want[3:7] and perm.take(n, n + 3) == []
        made = perm._order
        perm.take(0, 2)
        assert perm._order is made  # not drawn again per window


def test_the_kind_follows_the_size_alone():
    assert kind(1) == kind(EAGER_MAX) == "randperm" and kind(EAGER_MAX + 1) == "feistel"
    assert type(permutation(EAGER_MAX, 1)) is EagerPermutation and permutation(EAGER_MAX, 1).kind == "randperm"
    big = permutation(EAGER_MAX + 1, 1)  # lazy: nothing of size n is made
    assert type(big) is FeistelPermutation and big.kind == "feistel"
    assert big.take(EAGER_MAX - 1, EAGER_MAX + 5) == [Reference(EAGER_MAX + 1, 1).at(p) for p in (EAGER_MAX - 1, EAGER_MAX)]


def test_an_empty_order_is_refused():
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"a permutation of {n} elements"):
            FeistelPermutation(n, 0)
