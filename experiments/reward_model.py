"""Stage 2, the K-way reward model (InstructGPT §3.5, App. C.2).

    python experiments/reward_model.py --config experiments/configs/rm_tiny.json [--set optimizer.lr=1e-4 ...]

The same as ``rlhf-jax rm ...`` (``rlhf_jax.cli``; needs ``pip install -e .``).  The tiny config
starts from the SFT model in ``runs/tiny/sft/model`` (fresh scalar head) and reads ranked
comparisons from ``runs/tiny/world/comparisons.jsonl`` (``tasks.make_comparisons`` on SFT samples);
the reward model, with ``reward_normalization.json``, lands in ``runs/tiny/rm/model``.
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", *sys.argv[1:]]))
