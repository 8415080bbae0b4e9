#!/usr/bin/env python
"""Checkpoint conversion (same as ``python -m megatron_growloop.convert``).

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR_OR.gguf --out CKPT
    python tools/convert_checkpoint.py mcore-to-hf --load CKPT --out HF_DIR
    torchrun --nproc_per_node N tools/convert_checkpoint.py reshard --load CKPT --out CKPT2 \\
        --target-tensor-parallel-size T --target-pipeline-model-parallel-size P
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_growloop.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
