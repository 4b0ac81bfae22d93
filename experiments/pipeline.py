"""The whole recipe end to end: ``rlhf-jax pipeline`` as a script.

    python experiments/pipeline.py                                   # the built-in world, runs/tiny/
    python experiments/pipeline.py --config experiments/configs/pipeline_real.json
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
