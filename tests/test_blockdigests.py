"""A file's block digests with its zero blocks as runs (migrator/blockdigests.py, pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from migrator.blockdigests import BlockDigests, ZeroRuns
from migrator.zeros import zero_digest

OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "set", "zero", "forget"]),
                         st.integers(0, 60), st.integers(0, 20)), max_size=40)


@given(OPS)
def test_runs_and_digests_match_a_model(ops: list[tuple[str, int, int]]) -> None:
    runs, digests = ZeroRuns(), BlockDigests()
    zero_model: set[int] = set()
    data_model: dict[int, int] = {}
    zeroed: set[int] = set()
    for op, a, n in ops:
        if op == "add":
            runs.add(a, a + n)
            zero_model |= set(range(a, a + n))
        elif op == "remove":
            runs.remove(a, a + n)
            zero_model -= set(range(a, a + n))
        elif op == "set":
            digests.set(a, n)
            data_model[a] = n
            zeroed.discard(a)
        elif op == "zero" and n:
            was = digests.set_zero(a, n)
            assert sorted(was) == sorted(b for b in data_model if a <= b < a + n)
            for b in range(a, a + n):
                data_model.pop(b, None)
                zeroed.add(b)
        elif op == "forget":
            digests.forget_from(a)
            data_model = {b: d for b, d in data_model.items() if b < a}
            zeroed = {b for b in zeroed if b < a}
        starts, ends = runs.starts, runs.ends
        assert all(s < e for s, e in zip(starts, ends, strict=True))
        assert all(e < s for e, s in zip(ends, starts[1:], strict=False))  # disjoint, apart
    assert {b for s, c in runs for b in range(s, s + c)} == zero_model
    assert runs.blocks() == len(zero_model)
    assert all((b in runs) == (b in zero_model) for b in range(-1, 90))
    for a in range(0, 70, 7):
        gaps = {b for x, y in runs.gaps(a, a + 13) for b in range(x, y)}
        assert gaps == set(range(a, a + 13)) - zero_model
    assert {b: digests.get(b, 4096, 1 << 30) for b in range(100)} == {
        b: zero_digest(4096) if b in zeroed else data_model.get(b) for b in range(100)}
    assert len(digests) == len(data_model) + len(zeroed)


def test_a_4_tib_hole_is_one_run() -> None:
    d = BlockDigests()
    d.set(0, 11)
    d.set_zero(1, (1 << 26) - 2)
    d.set(1 << 25, 12)  # data written into the hole splits it
    assert list(d.zeros) == [(1, (1 << 25) - 1), ((1 << 25) + 1, (1 << 25) - 2)]
    assert d.get(5, 65536, 4 << 40) == zero_digest(65536)
    assert d.get((1 << 26) - 1, 65536, 4 << 40) is None  # never received
    assert len(d) == (1 << 26) - 1
