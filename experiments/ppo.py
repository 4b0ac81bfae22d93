"""Stage 3, PPO-ptx (InstructGPT §3.5, eq. 2, App. C.4).

    python experiments/ppo.py --config ppo.toml [--preset trl] [--set ppo.ptx_coef=1.0 ...]

The same as ``rlhf-jax ppo ...`` (``rlhf_jax.cli``).  The config names the SFT model directory
(``model.hf_dir``), the reward model (``reward_model``), prompts (``train_data``) and pretraining
text (``ptx_data``); the final policy lands in ``<workdir>/model``.
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
