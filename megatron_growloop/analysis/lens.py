"""Logit lens and Tuned Lens (Belrose et al. 2023; paper Fig. 2B/2C, App. E).

The lens at application ``k`` reads the residual stream *after* application ``k``
(``k = 0..K-1`` on the effective-depth axis; ``k = K-1`` is the final residual) and
decodes it with the model's own final norm and output layer.  The **logit lens**
decodes it as is; the **tuned lens** first applies an affine translator
``h -> h + A_k h + b_k`` (``A_k, b_k`` zero-initialised, so an untrained tuned lens *is*
the logit lens), trained on held-out text to minimise ``KL(P_final || Q_k)`` at the
same position (tuned-lens' default loss).

Training recipe (tuned-lens defaults): SGD with Nesterov momentum 0.9, learning rate
``lr * (1 - momentum)`` ("unit" lr 1.0 -> 0.1), weight decay 1e-3, linear decay to 0,
gradient clipping at 1.0; each translator's loss is back-propagated separately.  On a
CPU the step count and tokens per step are what the user can afford (the real runs in
``docs/analysis.md`` say what they used); ``init="lstsq"`` optionally starts every
translator from a ridge regression of the final residual on the layer's residual (a
documented deviation, off by default).

Lenses save as ``params.pt`` (translator state dict, keys ``"{k}.weight"``/``"{k}.bias"``)
plus ``config.json`` -- the tuned-lens package's layout -- and load back with
:meth:`TunedLens.load`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..eval import metrics, primitives
from ..eval.engine import LogProbEngine
from . import measures
from .access import AnalysisModel, seq_mask
from .prompts import PromptSet
from .results import Result, draw_structure, mpl


class TunedLens(torch.nn.Module):
    """One affine translator per effective-depth position (residual after application ``k``)."""

    def __init__(self, hidden_size: int, num_positions: int, bias: bool = True):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.num_positions = int(num_positions)
        self.bias = bool(bias)
        self.translators = torch.nn.ModuleList(
            [torch.nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_positions)]
        )
        for t in self.translators:
            torch.nn.init.zeros_(t.weight)
            if bias:
                torch.nn.init.zeros_(t.bias)
        self.meta: Dict[str, Any] = {}

    @classmethod
    def for_model(cls, am: AnalysisModel, bias: bool = True) -> "TunedLens":
        lens = cls(am.hidden_size, am.depth, bias)
        lens.meta = {"model": am.label, "schedule": am.schedule}
        return lens.to(am.device)

    def transform(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        h = hidden.float()
        return h + self.translators[k](h)

    def check(self, am: AnalysisModel) -> None:
        if self.num_positions != am.depth or self.hidden_size != am.hidden_size:
            raise UsageError(
                f"the lens has {self.num_positions} translators of width {self.hidden_size} but the model has "
                f"effective depth {am.depth} and hidden size {am.hidden_size}"
            )

    # ------------------------------------------------------------------ io
    def save(self, path) -> str:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.translators.state_dict().items()}, out / "params.pt")
        cfg = {
            "base_model_name_or_path": self.meta.get("model", ""),
            "d_model": self.hidden_size,
            "num_hidden_layers": self.num_positions,
            "bias": self.bias,
            "base_model_revision": None,
            "unembed_hash": None,
            "lens_type": "linear_tuned_lens",
            "megatron_growloop": {"positions": "residual after each application of the effective-depth schedule",
                                  **{k: v for k, v in self.meta.items() if k != "model"}},
        }
        (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        return str(out)

    @classmethod
    def load(cls, path) -> "TunedLens":
        p = Path(path)
        if not (p / "params.pt").exists() or not (p / "config.json").exists():
            raise UsageError(f"--lens-load {str(path)!r}: expected params.pt and config.json (a saved tuned lens)")
        cfg = json.loads((p / "config.json").read_text())
        lens = cls(cfg["d_model"], cfg["num_hidden_layers"], cfg.get("bias", True))
        lens.translators.load_state_dict(torch.load(p / "params.pt", map_location="cpu"))
        lens.meta = {"model": cfg.get("base_model_name_or_path", ""), **cfg.get("megatron_growloop", {})}
        return lens


def _decode(am: AnalysisModel, lens: Optional[TunedLens], hidden: torch.Tensor, k: int) -> torch.Tensor:
    h = hidden if lens is None else lens.transform(hidden, k).to(am.dtype)
    return am.decode(h)


# ---------------------------------------------------------------------------------- fitting
def _lstsq_init(am: AnalysisModel, lens: TunedLens, prompts: PromptSet, batch_size: int, ridge: float) -> None:
    """Ridge regression of ``h_final - h_k`` on ``[h_k, 1]`` (positions >= 1) for every translator."""
    K, d = am.depth, am.hidden_size
    xtx = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in range(K)]
    xty = [torch.zeros(d + 1, d, dtype=torch.float64) for _ in range(K)]
    for tokens, lengths, _ in prompts.batches(batch_size):
        tr = am.trace(tokens, logits=False)
        mask = seq_mask(lengths, tokens.shape[1]).transpose(0, 1)
        mask[0] = False
        y_final = tr.outputs[-1].double().cpu()[mask]
        for k in range(K):
            x = tr.outputs[k].double().cpu()[mask]
            xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            xtx[k] += xa.T @ xa
            xty[k] += xa.T @ (y_final - x)
    with torch.no_grad():
        for k in range(K - 1):
            A = xtx[k] + ridge * torch.eye(d + 1, dtype=torch.float64) * xtx[k].diagonal().mean()
            W = torch.linalg.solve(A, xty[k])  # [d+1, d]
            lens.translators[k].weight.copy_(W[:d].T.float())
            if lens.bias:
                lens.translators[k].bias.copy_(W[d].float())


def fit_tuned_lens(am: AnalysisModel, prompts: PromptSet, steps: int = 250, batch_size: int = 4,
                   lr: Optional[float] = None, momentum: float = 0.9, weight_decay: float = 1e-3,
                   clip: float = 1.0, optimizer: str = "sgd", init: str = "zeros", lens: Optional[TunedLens] = None,
                   seed: int = 0, ridge: float = 1e-3, log=None) -> TunedLens:
    """Train a tuned lens on ``prompts`` (held-out text); ``lens.meta['fit']`` records the recipe
    and the loss curve (mean KL per position at every step)."""
    if steps < 0:
        raise UsageError(f"--lens-steps must be >= 0, got {steps}")
    if optimizer not in ("sgd", "adam"):
        raise UsageError(f"--lens-optimizer {optimizer!r}: choose sgd or adam")
    if init not in ("zeros", "lstsq"):
        raise UsageError(f"--lens-init {init!r}: choose zeros or lstsq")
    lens = lens or TunedLens.for_model(am)
    lens.check(am)
    K = am.depth
    if init == "lstsq":
        _lstsq_init(am, lens, prompts, batch_size, ridge)
    if lr is None:
        lr = 1.0 if optimizer == "sgd" else 1e-3
    params = list(lens.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr * (1 - momentum), momentum=momentum, nesterov=True,
                              weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, amsgrad=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / max(steps, 1)))
    batches = list(prompts.batches(batch_size))
    rng = random.Random(seed)
    order: List[int] = []
    history: List[List[float]] = []
    with am.parameters_frozen():
        for step in range(steps):
            if not order:
                order = list(range(len(batches)))
                rng.shuffle(order)
            tokens, lengths, _ = batches[order.pop()]
            tr = am.trace(tokens, logits=True)
            mask = seq_mask(lengths, tokens.shape[1]).to(tr.logits.device)  # [b, s]
            logp_final = F.log_softmax(tr.logits, dim=-1)
            opt.zero_grad(set_to_none=True)
            losses = []
            for k in range(K):
                with torch.enable_grad():
                    logq = F.log_softmax(_decode(am, lens, tr.outputs[k].detach(), k), dim=-1)
                    kl = measures.kl_div(logp_final, logq)[mask].mean()
                    kl.backward()
                losses.append(float(kl))
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            history.append(losses)
            if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
                log(f"tuned lens step {step + 1}/{steps}: mean KL {np.mean(losses):.4f} (first {losses[0]:.3f}, "
                    f"middle {losses[K // 2]:.3f})")
    lens.meta["fit"] = {"steps": steps, "batch_size": batch_size, "lr": lr, "momentum": momentum,
                        "weight_decay": weight_decay, "clip": clip, "optimizer": optimizer, "init": init,
                        "seed": seed, "prompts": prompts.describe(),
                        "tokens_per_step": int(np.mean([sum(b[1]) for b in batches])) if batches else 0,
                        "loss_history": history}
    return lens


# ---------------------------------------------------------------------------------- evaluation
class LensResult(Result):
    kind = "lens"

    def plot(self, path: str) -> str:
        plt = mpl()
        A = self.arrays
        K = len(A["logit_kl"])
        x = np.arange(K)
        has_acc = "tuned_acc_norm" in A and len(A["tuned_acc_norm"]) == K
        fig, axes = plt.subplots(1, 3 if has_acc else 2, figsize=(14 if has_acc else 9.5, 3.4))
        ax = axes[0]
        ax.plot(x, np.maximum(A["logit_kl"], 1e-6), marker="o", ms=3, label="logit lens")
        ax.plot(x, np.maximum(A["tuned_kl"], 1e-6), marker="o", ms=3, label="tuned lens")
        ax.set_yscale("log")
        ax.set_ylabel("KL(final || lens) [nats]")
        ax.legend(fontsize=7)
        ax = axes[1]
        ax.plot(x, A["logit_top5"], marker="o", ms=3, label="logit lens")
        ax.plot(x, A["tuned_top5"], marker="o", ms=3, label="tuned lens")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("top-5 overlap with final")
        if has_acc:
            ax = axes[2]
            ax.plot(x, A["logit_acc_norm"], marker="o", ms=3, label="logit lens")
            ax.plot(x, A["tuned_acc_norm"], marker="o", ms=3, label="tuned lens")
            ch = self.scalars.get("task_chance")
            if ch:
                ax.axhline(ch, color="grey", ls="--", lw=0.8, label="chance")
            ax.set_ylim(0, 1.02)
            ax.set_ylabel(f"early-exit acc_norm ({self.config.get('task')})")
            ax.legend(fontsize=7)
        for ax in axes:
            draw_structure(ax, self.model)
            ax.set_xlabel("lens after application (effective depth)", fontsize=8)
            ax.set_xlim(-0.5, K - 0.5)
        fit = self.config.get("lens_fit") or {}
        fig.suptitle(f"Early exit -- {self.title}  (tuned lens: {fit.get('steps', 0)} steps, {fit.get('optimizer', '')}, "
                     f"init {fit.get('init', 'zeros')})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@torch.no_grad()
def lens_metrics_many(am: AnalysisModel, lenses: Dict[str, Optional[TunedLens]], prompts: PromptSet,
                      batch_size: int = 4, k_top: int = 5) -> Dict[str, Dict[str, np.ndarray]]:
    """:func:`lens_metrics` for several lenses from one forward per batch."""
    K = am.depth
    acc = {name: {q: torch.zeros(K, dtype=torch.float64) for q in ("kl", "kl_reverse", "top", "top1", "ce")}
           for name in lenses}
    n_tok, n_ce = 0, 0
    for tokens, lengths, _ in prompts.batches(batch_size):
        tr = am.trace(tokens)
        mask = seq_mask(lengths, tokens.shape[1]).to(tr.logits.device)
        nxt = torch.zeros_like(mask)
        nxt[:, :-1] = mask[:, 1:]
        labels = torch.roll(tokens.to(tr.logits.device), -1, dims=1)
        logp = F.log_softmax(tr.logits, dim=-1)
        for name, lens in lenses.items():
            a = acc[name]
            for k in range(K):
                logits = _decode(am, lens, tr.outputs[k], k)
                logq = F.log_softmax(logits, dim=-1)
                a["kl"][k] += float(measures.kl_div(logp, logq)[mask].double().sum())
                a["kl_reverse"][k] += float(measures.kl_div(logq, logp)[mask].double().sum())
                a["top"][k] += float(measures.topk_overlap(logits, tr.logits, k_top)[mask].double().sum())
                a["top1"][k] += float((logits.argmax(-1) == tr.logits.argmax(-1))[mask].double().sum())
                ce = -logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                a["ce"][k] += float(ce[nxt].double().sum())
        n_tok += int(mask.sum())
        n_ce += int(nxt.sum())
    out = {}
    for name, a in acc.items():
        out[name] = {q: (v / max(n_tok, 1)).numpy() for q, v in a.items() if q != "ce"}
        out[name]["ce"] = (a["ce"] / max(n_ce, 1)).numpy()
    return out


def lens_metrics(am: AnalysisModel, lens: Optional[TunedLens], prompts: PromptSet, batch_size: int = 4,
                 k_top: int = 5) -> Dict[str, np.ndarray]:
    """Per position: ``KL(P_final || Q_k)``, ``KL(Q_k || P_final)``, top-``k_top`` overlap with the
    final top-``k_top``, top-1 agreement and the lens' next-token cross entropy, averaged over all
    real tokens (``lens=None``: logit lens)."""
    return lens_metrics_many(am, {"lens": lens}, prompts, batch_size, k_top)["lens"]


@torch.no_grad()
def early_exit_loglikelihoods_many(am: AnalysisModel, lenses: Dict[str, Optional[TunedLens]], items,
                                   encode_pair) -> Dict[str, np.ndarray]:
    """:func:`early_exit_choice_loglikelihoods` for several lenses from one forward per item."""
    K = am.depth
    n_choice = max(len(it.choices) for it in items)
    ll = {name: np.full((K, len(items), n_choice), -np.inf) for name in lenses}
    for i, it in enumerate(items):
        pairs = [encode_pair(c, x) for c, x in it.requests()]
        seqs = [(c + x)[:-1] for c, x in pairs]
        width = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = torch.tensor(s)
        tr = am.trace(tokens, logits=False)
        rows, pos, targets = [], [], []
        for r, (c, x) in enumerate(pairs):
            for j, t in enumerate(x):
                rows.append(r)
                pos.append(len(c) - 1 + j)
                targets.append(t)
        dev = tr.outputs[0].device
        rows_t, pos_t, tgt = (torch.tensor(v, device=dev) for v in (rows, pos, targets))
        for k in range(K):
            h = tr.outputs[k][pos_t, rows_t].unsqueeze(1)  # [N, 1, h]
            for name, lens in lenses.items():
                logq = F.log_softmax(_decode(am, lens, h, k)[0], dim=-1)  # [N, V]
                picked = logq.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()
                sums = np.zeros(len(pairs))
                np.add.at(sums, np.asarray(rows), picked)
                ll[name][k, i, : len(pairs)] = sums
    return ll


def early_exit_choice_loglikelihoods(am: AnalysisModel, lens: Optional[TunedLens], items, encode_pair) -> np.ndarray:
    """``ll[k, i, j]``: log-likelihood of choice ``j`` of item ``i`` decoded by the lens after
    application ``k`` (tokenised with ``encode_pair(context, continuation)``, the scoring
    engine's lm-eval convention; at ``k = K-1`` with an untrained lens this equals the model's
    own multiple-choice scores)."""
    return early_exit_loglikelihoods_many(am, {"lens": lens}, items, encode_pair)["lens"]


def early_exit_accuracy(ll: np.ndarray, items) -> Dict[str, np.ndarray]:
    """Per-position ``acc`` and ``acc_norm`` (lm-eval's definitions, via the eval package's metrics)."""

    K = ll.shape[0]
    acc = np.zeros(K)
    accn = np.zeros(K)
    for k in range(K):
        for i, it in enumerate(items):
            pred = metrics.predictions(ll[k, i, : len(it.choices)], it.choices)
            acc[k] += pred["acc"] == it.gold
            accn[k] += pred["acc_norm"] == it.gold
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": accn / n}


def lens_analysis(am: AnalysisModel, prompts: PromptSet, lens: Optional[TunedLens] = None,
                  fit_prompts: Optional[PromptSet] = None, fit_kwargs: Optional[Dict[str, Any]] = None,
                  task: Optional[str] = "va_math_d0", task_items: int = 20, task_seed: int = 0,
                  num_fewshot: int = 5, template: str = "fill_blank", batch_size: int = 4,
                  log=None) -> "tuple[LensResult, TunedLens]":
    """Logit lens and tuned lens on ``prompts``; the tuned lens is ``lens`` or is fitted on
    ``fit_prompts``.  With a tokenizer and a ``task`` (a reasoning primitive), also the
    early-exit accuracy per position (Fig. 2C)."""
    if lens is None:
        if fit_prompts is None:
            raise UsageError("the tuned lens needs held-out prompts to train on (or --lens-load DIR)")
        lens = fit_tuned_lens(am, fit_prompts, log=log, **(fit_kwargs or {}))
    lens.check(am)
    both = lens_metrics_many(am, {"logit": None, "tuned": lens}, prompts, batch_size)
    logit, tuned = both["logit"], both["tuned"]
    arrays: Dict[str, np.ndarray] = {}
    for name, m in (("logit", logit), ("tuned", tuned)):
        arrays[f"{name}_kl"] = m["kl"]
        arrays[f"{name}_kl_reverse"] = m["kl_reverse"]
        arrays[f"{name}_top5"] = m["top"]
        arrays[f"{name}_top1"] = m["top1"]
        arrays[f"{name}_ce"] = m["ce"]
    fit = dict(lens.meta.get("fit") or {})
    if fit.get("loss_history"):
        arrays["fit_loss_history"] = np.asarray(fit.pop("loss_history"), dtype=float)
    scalars: Dict[str, Any] = {}
    config: Dict[str, Any] = {"prompts": prompts.describe(), "lens_fit": fit, "dtype": str(am.dtype),
                              "kl": "KL(P_final || Q_lens) averaged over all real tokens (kl_reverse: KL(Q || P))",
                              "task": None}
    if task and am.tokenizer is not None:

        items = primitives.generate_task(task, task_items, seed=task_seed, num_fewshot=num_fewshot, template=template)
        engine = LogProbEngine(am.model, am.tokenizer, vocab_size=am.vocab_size)
        lls = early_exit_loglikelihoods_many(am, {"logit": None, "tuned": lens}, items, engine.encode_pair)
        for name, ll in lls.items():
            accs = early_exit_accuracy(ll, items)
            arrays[f"{name}_acc"] = accs["acc"]
            arrays[f"{name}_acc_norm"] = accs["acc_norm"]
            if log:
                log(f"lens: early-exit {name} lens acc_norm per position {np.round(accs['acc_norm'], 2).tolist()}")
        scalars["task_chance"] = primitives.get_task(task).chance
        scalars["final_acc_norm"] = float(arrays["logit_acc_norm"][-1])
        config.update(task=task, task_items=task_items, task_seed=task_seed, num_fewshot=num_fewshot,
                      template=template)
    scalars["mean_tuned_kl"] = float(np.mean(tuned["kl"]))
    scalars["mean_logit_kl"] = float(np.mean(logit["kl"]))
    scalars["noise_floor"] = {"final_position_kl": float(tuned["kl"][-1]), "final_position_top5": float(tuned["top"][-1])}
    return LensResult(model=am.describe(), config=config, arrays=arrays, scalars=scalars), lens
