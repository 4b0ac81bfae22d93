"""Named recipes: whole runs on real models and data, one command each.

``RECIPES`` maps the ``"recipe"`` field of a pipeline config file to its config class and
driver; ``rlhf-jax pipeline --config FILE`` runs the recipe the file names (README "Real
models").
"""

from __future__ import annotations

from rlhf_jax.recipes.hh import HHRecipeConfig, run_hh_recipe

RECIPES = {"smollm2_hh": (HHRecipeConfig, run_hh_recipe)}

__all__ = ["RECIPES", "HHRecipeConfig", "run_hh_recipe"]
