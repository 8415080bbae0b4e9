"""Benchmark: multiple-choice scoring speed, full forwards vs shared-context KV-cache scoring.

    python benchmarks/eval.py --hf "$(python -c 'from megatron_growloop.convert import smollm2_hf_dir; print(smollm2_hf_dir())')" \
        --tasks copy_random,va_basic_d2 --limit 5 --out bench_eval.json

For each task, scores the same items with both strategies of
:class:`~megatron_growloop.eval.engine.LogProbEngine`, checks that the log-likelihoods
agree, and prints seconds per item, forward calls per item and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load")
    src.add_argument("--hf")
    p.add_argument("--tasks", default="copy_random,va_basic_d2")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--num-fewshot", type=int, default=5)
    p.add_argument("--template", default="fill_blank")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from megatron_growloop.errors import cli_errors

    with cli_errors("benchmarks/eval.py"):
        from megatron_growloop.eval import primitives, scoring
        from megatron_growloop.eval.engine import LogProbEngine
        from megatron_growloop.eval.loader import describe_model, load_for_eval

        model, meta, tok = load_for_eval(load=args.load, hf=args.hf)
        rows = []
        for name in primitives.resolve_tasks(args.tasks):
            items = primitives.generate_task(name, args.limit, num_fewshot=args.num_fewshot, template=args.template)
            res = {}
            for mode, use_cache in (("full", False), ("shared", True)):
                eng = LogProbEngine(model, tok, use_cache=use_cache, batch_size=args.batch_size)
                t0 = time.perf_counter()
                scores = scoring.score_choices(eng, None, items)
                dt = time.perf_counter() - t0
                res[mode] = (dt / len(items), eng.forward_calls / len(items), scores)
            diff = max(abs(a - b) for sa, sb in zip(res["full"][2], res["shared"][2]) for a, b in zip(sa, sb))
            prompt = max(len(eng.encode_pair(it.context, it.continuations[0])[0]) for it in items)
            rows.append({"task": name, "items": len(items), "choices": len(items[0].choices),
                         "max_prompt_tokens": prompt,
                         "full_s_per_item": res["full"][0], "full_forwards_per_item": res["full"][1],
                         "shared_s_per_item": res["shared"][0], "shared_forwards_per_item": res["shared"][1],
                         "speedup": res["full"][0] / res["shared"][0], "max_abs_ll_diff": diff})
        print(f"{'task':14s} {'prompt tok':>10s} {'full s/item':>12s} {'shared s/item':>14s} "
              f"{'speed-up':>9s} {'fwd calls full/shared':>22s} {'max |dll|':>10s}")
        for r in rows:
            print(f"{r['task']:14s} {r['max_prompt_tokens']:10d} {r['full_s_per_item']:12.2f} "
                  f"{r['shared_s_per_item']:14.2f} {r['speedup']:9.2f} "
                  f"{r['full_forwards_per_item']:10.1f}/{r['shared_forwards_per_item']:<11.1f} "
                  f"{r['max_abs_ll_diff']:10.2e}")
        out = {"rows": rows, "model": describe_model(model, meta), "args": vars(args),
               "threads": os.environ.get("OMP_NUM_THREADS")}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2, default=str)
            print(f"wrote {args.out}")
        return out


if __name__ == "__main__":
    main()
