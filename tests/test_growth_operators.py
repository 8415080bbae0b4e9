"""Growth operators as pure index maps, their lineage, and the documented index lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.growth import operators as ops
from megatron_growloop.growth.lineage import block_table, format_table, middle_blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "growth.md"


def test_lidas_4_to_8_and_formula():
    """Invariant (issue): LIDAS at depth L with c = L/2 gives old 0..c-1, c-B/2..c+B/2-1, c..L-1;
    4 -> 8 is 0 1 0 1 2 3 2 3; the inserted copy is centred on the new middle."""
    assert ops.lidas(4, 4) == [0, 1, 0, 1, 2, 3, 2, 3]
    for depth in range(4, 64, 4):
        c = depth // 2
        assert ops.lidas(depth, 4) == list(range(c)) + list(range(c - 2, c + 2)) + list(range(c, depth))
        lo, hi = ops.inserted_positions("lidas", depth, 4)
        assert (lo + hi) / 2 == (depth + 4) / 2
    assert ops.lidas(12, 6) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11]


def test_midas_duplicates_the_lower_middle_block_for_even_block_counts():
    """Invariant: MIDAS copies block ceil(n/2)-1 (0-based) of n blocks and inserts the copy right
    after it: the middle block for odd n, the lower of the two middle blocks for even n."""
    assert ops.midas(4, 4) == [0, 1, 2, 3] * 2
    assert ops.midas(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]          # n=2: block 0
    assert ops.midas(12, 4) == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11]  # n=3: block 1
    assert ops.midas(16, 4)[8:12] == [4, 5, 6, 7]                              # n=4: block 1
    for depth in range(4, 64, 4):
        m = ops.midas(depth, 4)
        assert sorted(set(m)) == list(range(depth)) and len(m) == depth + 4


def test_stack_copies_the_top_block():
    """Invariant: gradual stacking appends a copy of the last B layers."""
    assert ops.stack(8, 4) == list(range(8)) + [4, 5, 6, 7]


def test_lineage_of_24_and_32_layer_models():
    """Invariant: after growing 4 -> 24/32, MIDAS and stacking repeat abcd, LIDAS has ab in the
    lower and cd in the upper half, and LIDAS's birth steps form a palindrome with the youngest
    layers in the centre."""
    for final in (24, 32):
        k = final // 4
        lin = {}
        for m in ops.GROW_METHODS:
            x = ops.initial_lineage(4)
            for s in range(k - 1):
                x = ops.grow_lineage(x, m, 4, s + 1)
            lin[m] = x
            roots = [l.root for l in x]
            assert roots == ops.compose(ops.growth_maps(m, 4, final, 4))
        assert [l.root for l in lin["midas"]] == [0, 1, 2, 3] * k
        assert [l.root for l in lin["lidas"]] == [0, 1] * k + [2, 3] * k
        born = [l.born for l in lin["lidas"]]
        assert born == born[::-1] and born[final // 2 - 1] == born[final // 2] == k - 1
        assert born[:2] == [0, 0]
        assert [l.born for l in lin["stack"]] == [i // 4 for i in range(final)]
    midas24 = [l.born for l in _grown("midas", 24)]
    assert midas24 == [0] * 4 + [2] * 4 + [4] * 4 + [5] * 4 + [3] * 4 + [1] * 4


def _grown(method, final):
    x = ops.initial_lineage(4)
    for s in range(final // 4 - 1):
        x = ops.grow_lineage(x, method, 4, s + 1)
    return x


def test_middle_blocks_and_block_table():
    """Invariant: the loop candidates of a 24-layer model are blocks 8-11 and 12-15 (the paper's
    choices), and the block table reports each block's roots and birth steps."""
    assert middle_blocks(24, 4)[:2] == [8, 12]
    assert middle_blocks(32, 4)[:2] == [12, 16]
    lineage = [l.to_dict() for l in _grown("lidas", 24)]
    rows = block_table(lineage, 4)
    assert rows[2] == {"start": 8, "end": 12, "roots": [0, 1, 0, 1], "born": [4, 4, 5, 5]}
    assert "--retrofit-loop 8:12:2, --retrofit-loop 12:16:2" in format_table(lineage, 4)


@pytest.mark.parametrize("call,msg", [
    (lambda: ops.lidas(6, 3), "even growth block size"),
    (lambda: ops.growth_maps("midas", 10, 18, 4), "--num-layers 10 is not a positive multiple"),
    (lambda: ops.midas(10, 4), "not a positive multiple"),
    (lambda: ops.growth_maps("lidas", 4, 26, 4), "not reachable"),
    (lambda: ops.growth_maps("lidas", 8, 4, 4), "not reachable"),
    (lambda: ops.get_operator("bogus"), "unknown --grow-method"),
])
def test_bad_operator_settings_are_one_line_errors(call, msg):
    """Invariant: impossible growth settings raise a one-line UsageError naming the problem."""
    with pytest.raises(UsageError) as e:
        call()
    assert msg in str(e.value) and "\n" not in str(e.value)


def _doc_maps():
    """Parse the ``growth-maps`` block of docs/growth.md: ``method L->L': i i i ...`` lines."""
    text = DOC.read_text()
    block = re.search(r"```text growth-maps\n(.*?)```", text, re.S)
    assert block, "docs/growth.md lacks the ```text growth-maps block"
    maps = {}
    for line in block.group(1).splitlines():
        m = re.match(r"(\w+)\s+(\d+)->(\d+):\s+([\d ]+)$", line.strip())
        if m:
            maps[(m.group(1), int(m.group(2)), int(m.group(3)))] = [int(x) for x in m.group(4).split()]
    return maps


def test_documented_index_lists_match_the_operators():
    """Invariant: docs/growth.md lists every step of MIDAS and LIDAS for 4 -> 24 and 4 -> 32, and
    each documented list is what the operator computes."""
    maps = _doc_maps()
    for method in ("midas", "lidas"):
        for depth in range(4, 32, 4):
            key = (method, depth, depth + 4)
            assert key in maps, f"{key} not documented"
            assert maps[key] == ops.get_operator(method)(depth, 4), key
