"""Cost of the checkpoint reliability features (issue 14), measured side by side in one process:

* a training save (model + megatron-core's distributed optimizer, its state in the default
  ``dp_reshardable`` format; ``--no-distributed-optimizer``: the plain optimizer, model space)
  with and without the per-shard CRC-32
  (``--no-ckpt-checksums``), alternating, several rounds;
* the same save through megatron-core's default torch_dist writer (forked writer processes) and
  through the in-process writer threads used for training saves now (``training/save_strategy.py``);
* loading: the checksum verification alone, and the load itself.

    python benchmarks/ckpt_reliability.py --preset smollm-135m --rounds 3 \
        --out benchmarks/results/ckpt_reliability.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from megatron_growloop.model.arch import Arch, pad_vocab_size  # noqa: E402
from megatron_growloop.model.implementation import Implementation  # noqa: E402
from megatron_growloop.model.parallel import ParallelLayout  # noqa: E402
from megatron_growloop.model.presets import get_preset  # noqa: E402
from megatron_growloop.training import checkpointing, ckpt_validate  # noqa: E402
from megatron_growloop.training.factory import OptimizerSettings, build_stack  # noqa: E402
from megatron_growloop.training.initialize import init_distributed  # noqa: E402


def _arch(preset: str) -> Arch:
    p = get_preset(preset)
    return Arch(num_layers=p.num_layers, hidden_size=p.hidden_size, num_attention_heads=p.num_attention_heads,
                num_query_groups=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size, kv_channels=p.kv_channels,
                seq_length=p.seq_length, max_position_embeddings=p.max_position_embeddings,
                padded_vocab_size=pad_vocab_size(p.vocab_size), rotary_base=p.rotary_base,
                untie_embeddings_and_output_weights=not p.tie_embeddings)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="smollm-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false", default=True)
    a = ap.parse_args()
    init_distributed(1, 1)
    arch = _arch(a.preset)
    stack = build_stack(arch, ParallelLayout(), Implementation(), OptimizerSettings(use_distributed_optimizer=a.distributed_optimizer), init_seed=1)
    for m in stack.chunks:
        m.zero_grad_buffer()
    stack.optimizer.step()  # Adam moments exist, as after a training step
    root = Path(a.dir or tempfile.mkdtemp(prefix="ckpt_rel_"))
    variants = {
        "threads + crc32": dict(checksums=True),
        "threads, no crc32": dict(checksums=False),
        "megatron default writer, no crc32": dict(checksums=False, sharded_strategy="default"),
    }
    times = {k: [] for k in variants}
    it = 0
    for _ in range(a.rounds):
        for name, kw in variants.items():
            kw = dict(kw)
            if kw.get("sharded_strategy") == "default":
                kw["sharded_strategy"] = get_default_save_sharded_strategy()
            it += 1
            d = root / name.replace(" ", "_").replace(",", "").replace("+", "")
            times[name].append(_timed(lambda: checkpointing.save_checkpoint(
                str(d), it, stack.chunks, stack.optimizer, None, metadata={"arch": arch.to_meta()}, **kw)))
            shutil.rmtree(d)
    # checksum work alone, and loading
    d = root / "load"
    checkpointing.save_checkpoint(str(d), 1, stack.chunks, stack.optimizer, None, metadata={"arch": arch.to_meta()})
    ck = d / checkpointing.iter_dir_name(1)
    size = sum(f.stat().st_size for f in ckpt_validate.manifest_files(ck))
    crc_s = statistics.median(_timed(lambda: ckpt_validate.checksum_files(ckpt_validate.manifest_files(ck)))
                              for _ in range(a.rounds))
    verify_s = statistics.median(_timed(lambda: ckpt_validate.check_checksums(ck)) for _ in range(a.rounds))
    struct_s = statistics.median(_timed(lambda: ckpt_validate.check_structure(ck)) for _ in range(a.rounds))
    def load():
        ckpt_validate.forget_verified()
        checkpointing.load_checkpoint(str(d), stack.chunks, stack.optimizer)

    load_s = statistics.median(_timed(load) for _ in range(a.rounds))
    buf = bytes(256 << 20)
    crc_rate = (256 << 20) / _timed(lambda: zlib.crc32(buf)) / 1e9
    shutil.rmtree(root, ignore_errors=True)

    rows = [{"what": f"save: {k}", "seconds": statistics.median(v)} for k, v in times.items()]
    rows += [
        {"what": "checksum all files (page cache)", "seconds": crc_s},
        {"what": "verify checksums before load", "seconds": verify_s},
        {"what": "structure check before load", "seconds": struct_s},
        {"what": "load (model + optimizer), verification included", "seconds": load_s},
    ]
    optim = "distributed optimizer, dp_reshardable" if a.distributed_optimizer else "plain optimizer"
    print(f"{a.preset}: checkpoint {size / 2**20:.1f} MiB (model + Adam state, fp32; {optim}), "
          f"{a.rounds} rounds (median); "
          f"zlib.crc32 {crc_rate:.2f} GB/s in memory")
    print_table(rows, ["what", "seconds"])
    write_json(a.out, {"preset": a.preset, "optimizer": optim, "checkpoint_bytes": size, "rounds": a.rounds, "crc32_GBps": crc_rate,
                       "rows": rows, "save_times": times})


if __name__ == "__main__":
    main()
