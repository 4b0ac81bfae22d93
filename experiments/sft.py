"""Stage 1, supervised fine-tuning (InstructGPT §3.5, App. C.1).

    python experiments/sft.py --config experiments/configs/sft_tiny.json [--set loop.total_steps=200 ...]

The same as ``rlhf-jax sft ...`` (``rlhf_jax.cli``; needs ``pip install -e .``).  The tiny config
trains a small random GPT-2 on the synthetic world's demonstrations and expects the world's files
under ``runs/tiny/world/`` (``tasks.make_world_files`` plus a ``tokenizer.json`` trained with
``Tokenizer.train``); the model lands in ``runs/tiny/sft/model``.
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
