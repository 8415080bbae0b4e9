"""The planner's readable output: a table per plan, the ranked layouts of ``--search``, and the
one line ``pretrain`` prints at start-up."""

from __future__ import annotations

from typing import List

from .inputs import GB
from .planner import Plan
from .search import SearchResult, layout_name


def _g(n: float) -> str:
    return f"{n / GB:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _time(seconds: float) -> str:
    return f"{seconds:.3g} s"


def format_plan(p: Plan) -> str:
    s = p.setup
    a = s.arch
    loop = f", Loop({a.loop}) effective depth {a.effective_depth}" if a.loop else ""
    lines = [
        f"model: {a.num_layers} layers{loop}, hidden {a.hidden_size}, vocab {a.padded_vocab_size} "
        f"({'tied' if a.tied else 'untied'}), seq {a.seq_length}: {p.params_total:,} parameters ({_params(p.params_total)})",
        f"layout: {layout_name(s)} on {s.gpus} GPUs; micro batch {s.micro_batch_size} x {s.num_microbatches} "
        f"micro-batches x DP {s.dp} = global batch {s.global_batch}; {s.impl.dtype}"
        f"{' FP8 ' + s.impl.fp8_format if s.impl.fp8_format else ''}, {s.impl.transformer_impl}, "
        f"{'distributed' if s.distributed_optimizer else 'replicated'} optimizer",
        "",
        f"{'PP':>3} {'layers':>6} {'apps':>5} {'params/rank':>14} {'in-flight':>9} {'weights':>8} {'grads':>8} "
        f"{'optim':>8} {'activ':>8} {'peak GB':>8}",
    ]
    for st in p.stages:
        lines.append(
            f"{st.pp_rank:>3} {st.layers:>6} {st.applications:>5} {st.params:>14,} {st.in_flight:>9} {_g(st.weights):>8} "
            f"{_g(st.grads):>8} {_g(st.optimizer):>8} {_g(st.activations):>8} {_g(st.peak):>8}"
        )
    lines.append(f"(every TP rank of a stage holds the same; peak includes transients of "
                 f"{_g(max(st.transient for st in p.stages))} GB)")
    if s.recurrence is not None:
        worst = s.worst_step()
        lines.append(f"randomized/truncated recurrence: {s.recurrence.describe()}; memory at the largest step "
                     f"(Loop({worst.step_loop}), {sum(worst.stage_grad_applications())} applications with autograd); "
                     f"FLOPs and step time are expectations over k")
    if p.growth_stages:
        lines += ["", "growth stages:"]
        for g in p.growth_stages:
            lines.append(f"  stage {g.index}: {g.num_layers} layers x {g.iterations} iterations, peak "
                         f"{_g(max(st.peak for st in g.stages))} GB")
        for st in p.growth_steps:
            worst = max(st.ranks, key=lambda r: r.device_peak)
            lines.append(
                f"  growth step {st.index + 1} after iteration {st.before_iteration}: {st.from_layers} -> "
                f"{st.to_layers} layers, device peak {_g(worst.device_peak)} GB (stage {worst.pp_rank}: source "
                f"{_g(worst.source)} + save transient {_g(worst.save_transient)}, target {_g(worst.target)}), "
                f"transfer buffer {_g(max(r.transfer for r in st.ranks))} GB host memory per rank, "
                f"{max(r.received_layers for r in st.ranks)} layers received")
    lines += [
        "",
        f"compute: {p.flops_per_step:.4g} FLOPs per step; estimated step time {_time(p.step.seconds)} "
        f"(ideal at MFU {p.cluster.assume_mfu:g}: {_time(p.step.ideal_seconds)}; slowest stage {p.step.bottleneck_stage})"
        + (f"; mean over the growing run {_time(p.mean_step_seconds)}" if p.growth_stages else ""),
    ]
    if p.training_flops:
        lines.append(f"         {p.training_flops:.4g} training FLOPs over --train-iters {s.train_iters}")
    lim = p.limiting_stage
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {_g(p.peak)} GB of {p.cluster.gpu_memory_gb:g} GB per GPU "
                 f"(limiting rank: pipeline stage {lim.pp_rank})")
    return "\n".join(lines)


def format_search(r: SearchResult, top: int = 15) -> str:
    lines = [f"{len(r.plans)} layouts for {r.base.gpus} GPUs, {len(r.fitting)} fit in "
             f"{r.cluster.gpu_memory_gb:g} GB (ranked by estimated step time at MFU {r.cluster.assume_mfu:g}):", "",
             f"{'#':>3} {'layout':<44} {'step s':>9} {'peak GB':>8} {'limiting rank':>14} {'fits':>5}"]
    shown: List = r.plans[:top]
    for i, p in enumerate(shown, 1):
        lim = p.limiting_stage
        lines.append(f"{i:>3} {layout_name(p.setup):<44} {p.mean_step_seconds:>9.3g} {_g(p.peak):>8} "
                     f"{'PP ' + str(lim.pp_rank):>14} {'yes' if p.fits else 'no':>5}")
    if len(r.plans) > top:
        lines.append(f"... {len(r.plans) - top} more (--top N, or --json for all)")
    if r.fitting:
        best = r.fitting[0].setup
        flags = (f"--tensor-model-parallel-size {best.layout.tp} --pipeline-model-parallel-size {best.layout.pp}"
                 + (" --sequence-parallel" if best.sequence_parallel else "")
                 + (f" --recompute-granularity {best.impl.recompute_granularity}" if best.impl.recompute_granularity else "")
                 + (" --recompute-method uniform --recompute-num-layers 1"
                    if best.impl.recompute_granularity == "full" else ""))
        lines += ["", f"best: {flags}"]
    else:
        lines += ["", "no layout fits: add GPUs, recomputation, a smaller micro batch or the distributed optimizer"]
    return "\n".join(lines)


def startup_line(p: Plan) -> str:
    """The line ``pretrain`` prints for its own layout (cf. Megatron-LM's theoretical memory report)."""
    lim = p.limiting_stage
    return (
        f"planner: {p.params_total:,} parameters; per-rank peak {_g(p.peak)} GB (limiting: pipeline stage "
        f"{lim.pp_rank}: weights {_g(lim.weights)}, grads {_g(lim.grads)}, optimizer {_g(lim.optimizer)}, "
        f"activations {_g(lim.activations)} GB); {p.flops_per_step:.4g} FLOPs/step; estimated step "
        f"{_time(p.step.seconds)} at MFU {p.cluster.assume_mfu:g}"
    )
