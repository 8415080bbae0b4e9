#!/usr/bin/env python
"""JSONL/text -> Megatron indexed dataset (.bin/.idx).  See --help.

Example:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model smollm2 --append-eod
    # then: --data-path data/corpus_text_document
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_growloop.data.preprocess_cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
