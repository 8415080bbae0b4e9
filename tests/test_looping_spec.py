"""Loop specs, schedules and pipeline layouts (pure functions)."""

from __future__ import annotations

import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.looping.spec import (
    LoopSpec,
    RepeatBlock,
    apply_repeat_block,
    balanced_stage_sizes,
    build_schedule,
    check_stage_sizes,
    layout_to_str,
    parse_repeats_schedule,
    repeats_at,
    stage_local_schedule,
    valid_cuts,
)


@pytest.mark.parametrize(
    "text,prelude,block,k,coda",
    [("4x6", 0, 4, 6, 0), ("4-4x4-4", 4, 4, 4, 4), ("4-4×4-4", 4, 4, 4, 4), ("Loop(2-3X2-1)", 2, 3, 2, 1),
     (" 0-2x3-0 ", 0, 2, 3, 0)],
)
def test_parse(text, prelude, block, k, coda):
    s = LoopSpec.parse(text)
    assert (s.prelude, s.block, s.repeats, s.coda) == (prelude, block, k, coda)
    assert s.unique_layers == prelude + block + coda
    assert s.effective_depth == prelude + block * k + coda == len(s.schedule())
    assert LoopSpec.parse(str(s)) == s


@pytest.mark.parametrize("text", ["0x4", "4x0", "4-4x4", "4x4-4", "-1-2x2-1", "4", "x4", "4x4x4", "a-2x2-b", "", "4.5x2"])
def test_bad_specs_are_one_line_usage_errors(text):
    with pytest.raises(UsageError) as exc:
        LoopSpec.parse(text)
    msg = str(exc.value)
    assert "\n" not in msg and repr(text) in msg


def test_paper_example_schedule():
    """Loop(4-4×4-4): 12 unique layers, effective depth 24, block 4..7 applied 4 times."""
    s = LoopSpec.parse("4-4x4-4")
    assert (s.unique_layers, s.effective_depth) == (12, 24)
    assert s.schedule() == [0, 1, 2, 3] + [4, 5, 6, 7] * 4 + [8, 9, 10, 11]
    assert LoopSpec.parse("1-2x3-1").schedule() == [0, 1, 2, 1, 2, 1, 2, 3]


def test_repeat_blocks():
    assert apply_repeat_block(list(range(6)), RepeatBlock.parse("2:4:1")) == list(range(6))
    assert apply_repeat_block(list(range(6)), RepeatBlock.parse("2:4:3")) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    # composition with a loop: positions are effective-depth positions
    sched = build_schedule(4, LoopSpec.parse("1-2x2-1"), [RepeatBlock.parse("5:6:2")])
    assert sched == [0, 1, 2, 1, 2, 3, 3]
    with pytest.raises(UsageError, match="outside the model"):
        build_schedule(4, None, [RepeatBlock.parse("3:5:2")])
    for bad in ["3:3:2", "4:2:2", "1:2:0", "1:2", "a:b:c", "-1:2:2"]:
        with pytest.raises(UsageError):
            RepeatBlock.parse(bad)


def test_loop_must_match_num_layers():
    with pytest.raises(UsageError, match="unique layers"):
        build_schedule(5, LoopSpec.parse("4x2"))


def test_retrofit_block_to_loop():
    assert str(LoopSpec.from_block(24, RepeatBlock.parse("8:12:2"))) == "8-4x2-12"
    with pytest.raises(UsageError, match="outside the model"):
        LoopSpec.from_block(10, RepeatBlock.parse("8:12:2"))


def test_valid_cuts_never_split_a_block():
    sched = LoopSpec.parse("4-4x4-4").schedule()
    ok = valid_cuts(sched, 12)
    assert [c for c in range(13) if ok[c]] == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]


@pytest.mark.parametrize(
    "loop,pp,sizes",
    [
        ("4-4x4-4", 1, [12]),
        ("4-4x4-4", 2, [4, 8]),       # 4 | 16+4 applications: the block cannot be split
        ("4-4x4-4", 3, [4, 4, 4]),    # 4 | 16 | 4
        ("1-2x3-1", 2, [1, 3]),
        ("2x3", 2, [0, 2]),           # an empty (embedding-only) first stage
        ("4-2x2-4", 2, [4, 6]),       # 4 | 4+4 applications (5|5 would cut the block)
    ],
)
def test_balanced_stage_sizes(loop, pp, sizes):
    spec = LoopSpec.parse(loop)
    sched = spec.schedule()
    got = balanced_stage_sizes(sched, spec.unique_layers, pp)
    assert got == sizes and sum(got) == spec.unique_layers
    check_stage_sizes(sched, got)
    first = 0
    for n in got:  # every stage runs a contiguous part of the schedule
        stage_local_schedule(sched, first, n)
        first += n


def test_plain_model_layout_is_even():
    assert balanced_stage_sizes(list(range(8)), 8, 4) == [2, 2, 2, 2]
    assert layout_to_str([2, 3, 3]) == "Ett|ttt|tttL"


def test_cut_inside_block_is_refused():
    sched = LoopSpec.parse("1-2x3-1").schedule()
    with pytest.raises(UsageError, match="before layer 2"):
        check_stage_sizes(sched, [2, 2])
    with pytest.raises(UsageError, match="within one\\s+pipeline stage"):
        stage_local_schedule(sched, 0, 2)


def test_repeats_schedule():
    s = parse_repeats_schedule("100:2, 200:4")
    assert s == [(100, 2), (200, 4)]
    assert [repeats_at(s, it, 3) for it in (0, 99, 100, 199, 200, 10**6)] == [3, 3, 2, 2, 4, 4]
    for bad in ["100", "100:0", "-1:2", "200:2,100:3", "a:b", "100:2,100:3"]:
        with pytest.raises(UsageError):
            parse_repeats_schedule(bad)
