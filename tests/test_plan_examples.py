"""Every Llama-3 recipe in examples/ fits on its cluster according to the planner, and uses the
layout the planner's --search ranks first for it (so the recipes stay right when the planner
or the presets change)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, _env

RECIPES = ["llama3_8b_8xh100.sh", "llama3_8b_64xh100.sh", "looped_llama3_8b_width.sh",
           "lidas_llama3_4b_to_8b_pp4.sh"]


def _plan(recipe: str, mode: str) -> dict:
    env = _env()
    env.update(PLAN=mode, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "examples" / recipe), "--json"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_fits_with_the_layout_search_ranks_first(recipe):
    plan = _plan(recipe, "1")
    assert plan["fits"] and plan["peak_gb"] <= plan["gpu_memory_gb"], plan["peak_gb"]
    found = _plan(recipe, "search")
    best = found["best"]
    layout = plan["layout"]
    assert (best["tp"], best["pp"], best["dp"], best["sequence_parallel"], best["recompute"]) == (
        layout["tp"], layout["pp"], layout["dp"], layout["sequence_parallel"], layout["recompute"])
    assert best["peak_gb"] == plan["peak_gb"]


def test_recipes_cover_the_issue():
    """8B on 8 and 64 H100s, a looped 8B-width model, LIDAS 16 -> 32 layers under PP4."""
    plans = {r: _plan(r, "1") for r in RECIPES}
    assert plans["llama3_8b_8xh100.sh"]["layout"]["gpus"] == 8
    assert plans["llama3_8b_64xh100.sh"]["layout"]["gpus"] == 64
    looped = plans["looped_llama3_8b_width.sh"]["model"]
    assert looped["loop"] and looped["hidden_size"] == 4096 and looped["effective_depth"] == 32
    grow = plans["lidas_llama3_4b_to_8b_pp4.sh"]
    assert grow["layout"]["pp"] == 4 and grow["model"]["growth"] == {"method": "lidas", "block_size": 4,
                                                                     "final_layers": 32}
    assert [g["num_layers"] for g in grow["growth_stages"]] == [16, 20, 24, 28, 32]
    assert round(grow["growth_stages"][0]["params_total"] / 1e9, 1) == 4.5
    assert grow["growth_stages"][-1]["params_total"] == 8_030_261_248
