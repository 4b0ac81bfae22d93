"""The notebooks: saved without outputs, one shared pipeline config, and executed top to bottom.

``quickstart.ipynb`` then ``overoptimization.ipynb`` run with ``nbclient`` on one tiny pipeline
run (``RLHF_JAX_NOTEBOOK_QUICK=1``) in a temporary ``RLHF_JAX_NOTEBOOK_RUNS``. The kernel is this
interpreter (a kernelspec for ``sys.executable`` written into a temporary ``JUPYTER_PATH``, which
jupyter_client searches first), and ``PYTHONPATH`` starts with the repository root so
``import rlhf_jax`` works without installing the package. What the notebooks compute is checked
against references written here (closed forms, the world's gold score, the PPO stage's logs).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat, nbclient and ipykernel run the notebooks")
nbclient = pytest.importorskip("nbclient", reason="nbformat, nbclient and ipykernel run the notebooks")
pytest.importorskip("ipykernel", reason="nbformat, nbclient and ipykernel run the notebooks")
pytest.importorskip("matplotlib", reason="the over-optimisation notebook plots with matplotlib")

from rlhf_jax.tasks import gold_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ORDER = ("quickstart.ipynb", "overoptimization.ipynb")  # the second reuses the first's run
RUN_NAME = "notebook_quick"  # the config cell's name when RLHF_JAX_NOTEBOOK_QUICK=1
CELL_TIMEOUT_S = 600


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ORDER)
def test_saved_valid_and_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: code cells {dirty} were saved with outputs; clear them before saving"


def test_notebooks_share_one_pipeline_config():
    """Both notebooks build the same ``PipelineConfig``, so the second reuses the first's run."""
    sources = []
    for name in ORDER:
        tagged = [c.source for c in _read(name).cells if "pipeline-config" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name}: expected one cell tagged 'pipeline-config', found {len(tagged)}"
        sources.append(tagged[0])
    assert sources[0] == sources[1]
    assert "PipelineConfig(" in sources[0] and "RLHF_JAX_NOTEBOOK" not in sources[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict:
    """Run both notebooks in order on one temporary run directory; errors raise
    ``CellExecutionError`` with the failing cell and its traceback."""
    from ipykernel.kernelspec import write_kernel_spec

    tmp = tmp_path_factory.mktemp("notebooks")
    jupyter_path = tmp / "jupyter"
    write_kernel_spec(path=jupyter_path / "kernels" / "python3")  # argv: sys.executable -m ipykernel_launcher
    runs = tmp / "runs"
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    notebooks = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_JAX_NOTEBOOK_RUNS", str(runs))
        mp.setenv("RLHF_JAX_NOTEBOOK_QUICK", "1")
        mp.setenv("PYTHONPATH", pythonpath)
        mp.setenv("JUPYTER_PATH", str(jupyter_path))
        for name in ORDER:
            nb = _read(name)
            client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                             resources={"metadata": {"path": str(REPO)}})
            client.execute()
            notebooks[name] = nb
    return {"notebooks": notebooks, "run": runs / RUN_NAME}


def _outputs(nb, output_type: str) -> list:
    return [o for c in _code_cells(nb) for o in c.outputs if o.output_type == output_type]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_every_cell_ran_without_errors(executed):
    for name, nb in executed["notebooks"].items():
        assert not _outputs(nb, "error"), name
        assert all(c.execution_count is not None for c in _code_cells(nb)), f"{name}: a cell did not run"


@pytest.mark.slow
def test_pipeline_ran_in_the_run_directory(executed):
    run = executed["run"]
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert (run / stage / "DONE").exists(), stage
        assert (run / stage / "model" / "config.json").exists(), stage
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["gold_score_ppo"]) and math.isfinite(summary["kl_to_sft"])
    config = json.loads((run / "pipeline_config.json").read_text())
    assert config["name"] == RUN_NAME and config["seed"] == 0


@pytest.mark.slow
def test_quickstart_values(executed):
    run = executed["run"]
    s = json.loads((run / "quickstart_summary.json").read_text())
    config = json.loads((run / "pipeline_config.json").read_text())
    p, n = config["prompt_len"], config["response_len"]

    # The kernel was this interpreter.
    assert os.path.realpath(s["python"]) == os.path.realpath(sys.executable)

    # The world: the exact answer that ended scores 1; never ending costs 0.5; the empty response
    # scores -1; two extra words cost 0.25 each (the gold score's docstring formula).
    gold = s["gold_examples"]
    assert gold["right ' pear red dog cat'"] == 1.0
    assert gold["right, but never emitted EOS"] == 0.5
    assert gold["rambling ' pear red dog cat cat cat'"] == 0.5
    assert gold["empty"] == -1.0
    assert [v for k, v in gold.items() if k.startswith("one mistake")][0] < 1.0

    b = 8
    assert s["rollout_shapes"] == {"tokens": [b, p + n], "prompt_mask": [b, p], "response": [b, n],
                                   "response_mask": [b, n], "logprobs": [b, n], "ended": [b]}
    for sample in s["samples"]:
        assert sample["gold"] == gold_score(sample["prompt"], sample["response"], sample["ended"])
    assert len(s["scores"]) == b and all(math.isfinite(x) for x in s["scores"])

    assert s["logprob_recompute_max_err"] < 1e-4  # sequence_logprobs reproduces the sampler's log-probs
    assert s["reward_sum_max_err"] < 1e-5
    assert s["gae_loop_max_err"] < 1e-5
    mean, var = s["whitened_mean_var"]
    assert abs(mean) < 1e-5 and abs(var - 1.0) < 1e-3
    assert abs(s["policy_loss_ratio_one"]) < 1e-5
    assert math.isfinite(s["policy_loss_sft"]) and s["value_loss"] >= 0

    # Eq. 1 on rewards (2, 1, 0) best-first: pairs with margins 1, 2, 1.
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 2.0, 1.0)) / 3
    assert s["toy_ranking_loss"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(s["heldout_ranking_loss"]) and 0.0 <= s["heldout_ranking_accuracy"] <= 1.0

    assert s["ppo_iterations"] == 2 and len(s["ppo_metrics"]) == 2
    for metrics in s["ppo_metrics"]:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["kl_coef"] == pytest.approx(config["ppo"]["ppo"]["kl"]["init_kl_coef"])
        assert "ptx_loss" in metrics


@pytest.mark.slow
def test_overoptimization_values(executed):
    run = executed["run"]
    s = json.loads((run / "overoptimization_summary.json").read_text())
    config = json.loads((run / "pipeline_config.json").read_text())

    # PPO points: the stage's held-out evaluations, gold-scored from its logged samples.
    evals = {r["step"]: r for r in _jsonl(run / "ppo" / "metrics.jsonl") if "eval/score" in r}
    by_step: dict[int, list[float]] = {}
    for rec in _jsonl(run / "ppo" / "samples.jsonl"):
        sample = json.loads(rec["text"])
        by_step.setdefault(rec["step"], []).append(gold_score(sample["prompt"], sample["response"], sample["ended"]))
    loop = config["ppo"]["loop"]
    steps = list(range(loop["eval_every"], loop["total_steps"] + 1, loop["eval_every"]))
    assert [pt["step"] for pt in s["ppo"]] == steps
    for pt in s["ppo"]:
        assert pt["kl"] == evals[pt["step"]]["eval/kl"] and pt["rm"] == evals[pt["step"]]["eval/score"]
        assert pt["gold"] == pytest.approx(sum(by_step[pt["step"]]) / len(by_step[pt["step"]]))

    # Best-of-N: KL = log N - (N-1)/N; picking by the RM within nested disjoint groups makes the
    # mean proxy score non-decreasing in N (the max of a union beats the mean of its parts' maxes).
    bon = s["best_of_n"]
    assert [pt["n"] for pt in bon] == config["best_of_n"] and s["n_max"] == max(config["best_of_n"])
    for pt in bon:
        assert pt["kl"] == pytest.approx(math.log(pt["n"]) - (pt["n"] - 1) / pt["n"])
        assert all(math.isfinite(pt[k]) for k in ("rm", "gold"))
    assert all(a["rm"] <= b["rm"] + 1e-9 for a, b in zip(bon, bon[1:])), bon
    assert -1.0 <= s["proxy_gold_correlation"] <= 1.0

    # The figure: shown inline and saved.
    nb = executed["notebooks"]["overoptimization.ipynb"]
    assert any("image/png" in o.data for o in _outputs(nb, "display_data")), "no inline PNG"
    assert Path(s["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
