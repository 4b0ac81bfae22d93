"""The suite's summary: one row per headline number, read back from each benchmark's JSON.

A row holds our number, the peer's (or, for decoding, the roofline bound), their ratio and the
issue's target (issue 8, "Targets"), and says whether the target is met.  A target applies to
the ratio (``target_on="ratio"``: "≥ 1.2× torch") or to our number itself (``"ours"``: "≥ 40%
of peak").  A row whose compared number is missing (the peer skipped) says "n/a", never "yes".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from experiments.benchmarks.common import format_table

# issue 8's CPU targets
GENERATION_TARGETS = {"tiny": 4.0, "small": 1.5}  # ours / transformers tokens/s
TRAIN_STEP_TARGET = ("small", 1.2, 0.40)  # model, ours / torch tokens/s, fraction of the matmul peak
PPO_TARGETS = {1: 2.5, 4: 1.5}  # TRL seconds / ours, by PPO epochs
GPU_PPO_TARGET = 5.0  # issue 18 item 5: TRL seconds / ours for the 1.1B iteration on one GPU
DECODE_FLOOR_TARGETS = {("tiny", 32): 1.5}  # issue 18 item 6: decode step / (matmuls + attention alone)


@dataclasses.dataclass(frozen=True)
class Row:
    """One headline number.  ``higher_is_better`` sets the ratio's direction (throughput:
    ours / peer; seconds: peer / ours), so a ratio > 1 always means we are ahead."""

    benchmark: str
    metric: str
    ours: float | None
    peer: float | None = None
    target: float | None = None
    target_on: Literal["ratio", "ours"] = "ratio"
    unit: Literal["tok/s", "s", "ms", "%", ""] = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or not (self.ours and self.peer):
            return None
        return self.ours / self.peer if self.higher_is_better else self.peer / self.ours

    @property
    def met(self) -> bool | None:
        """``target`` reached by the ratio or by ``ours`` (see ``target_on``); ``None`` without a
        target or without the number it applies to."""
        if self.target is None:
            return None
        value = self.ratio if self.target_on == "ratio" else self.ours
        if value is None:
            return None
        if self.target_on == "ours" and not self.higher_is_better:  # a ceiling on our own number
            return value <= self.target
        return value >= self.target

    def cells(self) -> list[str]:
        def fmt(x: float | None) -> str:
            if x is None:
                return "-"
            return {"tok/s": f"{x:.0f} tok/s", "s": f"{x:.2f} s", "ms": f"{1e3 * x:.2f} ms",
                    "%": f"{100 * x:.1f}%"}.get(self.unit, f"{x:.3f}")

        if self.target is None:
            target = "-"
        elif self.target_on == "ratio":
            target = f"≥ {self.target:g}×"
        else:
            sign = "≥" if self.higher_is_better else "≤"
            target = f"{sign} {100 * self.target:g}%" if self.unit == "%" else f"{sign} {self.target:g}"
            target += " s" if self.unit == "s" else ""
        met = {None: "n/a" if self.target is not None else "-", True: "yes", False: "NO"}[self.met]
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}×"
        return [self.benchmark, self.metric, fmt(self.ours), fmt(self.peer), ratio, target, met]


HEADERS = ["benchmark", "metric", "ours", "peer / bound", "ratio", "target", "met?"]


def _generation(d: Mapping[str, Any]) -> Iterator[Row]:
    for r in d.get("results", []):
        key = r.get("key")
        yield Row("generation", f"{key}: decode tokens/s vs transformers", r.get("ours_tok_s"), r.get("hf_tok_s"),
                  GENERATION_TARGETS.get(key), unit="tok/s")
        if r.get("ours_peak_frac") is not None:
            yield Row("generation", f"{key}: % of matmul peak", r["ours_peak_frac"], r.get("hf_peak_frac"), unit="%")


def _train_step(d: Mapping[str, Any]) -> Iterator[Row]:
    model, speed_target, mfu_target = TRAIN_STEP_TARGET
    for r in d.get("results", []):
        ours = [s for s in r["sides"] if s["label"].startswith("ours")]
        peer = min((s for s in r["sides"] if s["label"].startswith("torch")), key=lambda s: s["seconds"], default=None)
        best = max(ours, key=lambda s: s["tokens_per_s"])
        on_target = r["key"] == model
        vs = f" vs {peer['label']}" if peer else ""
        yield Row("train_step", f"{r['key']} {r['kind'].upper()}: tokens/s ({best['label']}){vs}",
                  best["tokens_per_s"], peer["tokens_per_s"] if peer else None,
                  speed_target if on_target else None, unit="tok/s")
        yield Row("train_step", f"{r['key']} {r['kind'].upper()}: MFU ({best['label']})", best.get("mfu"),
                  peer.get("mfu") if peer else None, mfu_target if on_target else None, target_on="ours", unit="%")
        if best.get("mfu_spec") is not None:
            yield Row("train_step", f"{r['key']} {r['kind'].upper()}: MFU of the data sheet's peak", best["mfu_spec"],
                      unit="%")


def _ppo_step(d: Mapping[str, Any], benchmark: str = "ppo_step") -> Iterator[Row]:
    """Seconds per iteration against TRL's, by PPO epochs; for the 1.1B Llama (``--shape
    llama-1b``, the GPU peer, or ``micro-llama``, its dry run) against issue 18's ≥ 5× at one
    epoch, with the generation phase's ratio next to it (``transformers.generate`` inside TRL
    against our rollout)."""
    gpu = d.get("shape_name") in ("llama-1b", "micro-llama")  # the GPU peer, or its dry run
    b = d.get("bench", {})
    for r in d.get("results", []):
        trl = r.get("trl") or {}
        target = (GPU_PPO_TARGET if r["epochs"] == 1 else None) if gpu else PPO_TARGETS.get(r["epochs"])
        what = (f"{b['arch']} {b['n_layers']}L d={b['d_model']} {b['dtype']}, {b['minibatches']} minibatches, "
                if gpu else "")
        yield Row(benchmark, f"{what}{r['epochs']} epoch(s): seconds per iteration vs TRL",
                  r["ours"]["seconds_per_iter"], trl.get("seconds_per_iter"), target, unit="s",
                  higher_is_better=False)
        if gpu:
            yield Row(benchmark, f"{what}generation: our rollout vs TRL's transformers.generate",
                      r["ours"]["split"]["gen"], trl.get("split", {}).get("gen"), unit="s", higher_is_better=False)


def _roofline(d: Mapping[str, Any]) -> Iterator[Row]:
    for r in d.get("decode", []):
        yield Row("roofline", f"{r['model']} batch {r['batch']}: decode tokens/s vs roofline bound", r["tok_s"],
                  r["bound"]["bound_tok_s"], unit="tok/s")
        if r.get("matmuls"):  # ratio: the share of the step its matmuls alone would take
            yield Row("roofline", f"{r['model']} batch {r['batch']}: decode step vs its matmuls alone (XLA)",
                      r["step_s"], r["matmuls"]["xla_s"], unit="ms", higher_is_better=False)
        if r.get("floor_s"):  # issue 18's CPU target: the tiny step within 1.5× of its kernel floor
            target = DECODE_FLOOR_TARGETS.get((r["model"], r["batch"]))
            yield Row("roofline", f"{r['model']} batch {r['batch']}: decode step ÷ its kernel floor (XLA matmuls "
                      "+ attention)", r["step_s"] / r["floor_s"], target=target, target_on="ours", higher_is_better=False)
            if r.get("blocked"):
                yield Row("roofline", f"{r['model']} batch {r['batch']}: the same with cache_block="
                          f"{r['blocked']['cache_block']}", r["blocked"]["step_s"] / r["floor_s"],
                          target=target, target_on="ours", higher_is_better=False)
            split = r.get("split") or {}
            forms = (("", split.get("step")), (f", cache_block={split.get('cache_block')}", split.get("blocked")))
            for name, form in forms:  # rows split over host devices: against the floor, and the floor split alike
                if form:
                    where = f"{r['model']} batch {r['batch']}: the same{name} on {split['devices']} host devices"
                    yield Row("roofline", where, form["step_s"] / r["floor_s"], target=target, target_on="ours",
                              higher_is_better=False)
                    yield Row("roofline", f"{where} ÷ the floor split alike", form["step_s"] / split["floor_s"],
                              target=target, target_on="ours", higher_is_better=False)
        if r.get("bound_spec"):
            yield Row("roofline", f"{r['model']} batch {r['batch']}: vs the data sheet's bound", r["tok_s"],
                      r["bound_spec"]["bound_tok_s"], unit="tok/s")


def _scaling(d: Mapping[str, Any]) -> Iterator[Row]:
    for name, fit in d.get("fits", {}).items():
        yield Row("scaling", f"s/iteration vs {name}: R² of the linear fit", fit["r2"])
    devices = d.get("sweeps", {}).get("devices", [])
    for p in devices[1:]:
        yield Row("scaling", f"{p['devices']} devices: seconds per iteration vs 1 device", p["seconds"],
                  devices[0]["seconds"], unit="s", higher_is_better=False)


def _profile_rows(what: str, profile: Mapping[str, Any] | None) -> Iterator[Row]:
    """A profiled call (``profile_summary``): its kernels' busy time against its wall time, and
    the matmuls' share of the kernel time."""
    if not profile or not profile.get("wall_s"):
        return
    yield Row("gpu_check", f"{what}: kernels busy vs the call's wall time (profiled)", profile["busy_s"],
              profile["wall_s"], unit="s")
    kernel_s = sum(profile["by_category"].values())
    if kernel_s:
        yield Row("gpu_check", f"{what}: matmul share of the kernel time (profiled)",
                  profile["by_category"].get("matmul", 0.0) / kernel_s, unit="%")


def _gpu_check(d: Mapping[str, Any]) -> Iterator[Row]:
    """Issue 18's targets on the 1.1B Llama (``gpu_check.TARGETS``), then the figures around them."""
    targets = d.get("targets", {})
    sft = d.get("sft")
    if sft:
        yield Row("gpu_check", f"1.1B SFT step {sft['batch']}×{sft['seq']}: MFU ({sft['attention_impl']} attention, "
                  f"remat {sft['remat_policy']})", sft["mfu"], target=targets.get("sft_mfu"), target_on="ours",
                  unit="%")
        yield Row("gpu_check", "1.1B SFT step: compile", sft["compile_s"], unit="s", higher_is_better=False)
        if sft.get("memory") and sft.get("plan_gib"):  # the first part: the process's peak is its own
            yield Row("gpu_check", "1.1B SFT step: device memory peak vs the memory plan (GiB; ratio > 1: the plan "
                      "bounds it)", sft["memory"]["peak"], sft["plan_gib"], higher_is_better=False)
        yield from _profile_rows("1.1B SFT step", sft.get("profile"))
    packed = d.get("sft_packed")
    if sft and packed:  # the cuDNN attention masking by lengths, against the same rows given as packed (a bias)
        yield Row("gpu_check", "1.1B SFT step, right-padded rows (masked by lengths) vs given as packed (a bias)",
                  sft["step_s"], packed["step_s"], unit="s", higher_is_better=False)
    decode = d.get("decode", [])
    best = {}  # the headline batch's faster form carries the target
    for r in decode:
        if r["batch"] == d.get("headline_decode_batch") and ("step_s" not in best or r["step_s"] < best["step_s"]):
            best = r
    for r in decode:
        form = "" if "scan_decode" not in r else ", scanned" if r["scan_decode"] else ", unrolled"
        form += f", cache_block={r['cache_block']}" if r.get("cache_block") else ""
        form += ", XLA command buffers" if r.get("compiler_options") else ""
        yield Row("gpu_check", f"1.1B decode batch {r['batch']} (bf16 weights{form}): fraction of the HBM bound",
                  r["hbm_bound_fraction"], target=targets.get("decode_hbm_fraction") if r is best else None,
                  target_on="ours", unit="%")
        yield Row("gpu_check", f"1.1B decode batch {r['batch']}{form}: tokens/s", r["tokens_per_s"], unit="tok/s")
        yield from _profile_rows(f"1.1B decode batch {r['batch']}{form} ({r['new']} steps)", r.get("profile"))
    ppo = d.get("ppo")
    if ppo:
        shape = f"{ppo['prompts']}×({ppo['prompt']}+{ppo['new']}), {ppo['minibatches']} minibatches"
        yield Row("gpu_check", f"1.1B PPO-ptx iteration {shape} vs its floor", ppo["iteration_s"], ppo["floor_s"],
                  target=targets.get("ppo_iteration_s"), target_on="ours", unit="s", higher_is_better=False)
        yield Row("gpu_check", "1.1B PPO-ptx iteration: compile", ppo["compile_s"],
                  target=targets.get("ppo_compile_s"), target_on="ours", unit="s", higher_is_better=False)
        for phase, seconds in (ppo.get("phases_s") or {}).items():
            yield Row("gpu_check", f"1.1B PPO phase {phase} vs its floor", seconds, ppo["floors_s"][phase], unit="s",
                      higher_is_better=False)
        graphs = ppo.get("command_buffers")
        if graphs:  # the same iteration compiled with XLA's command buffers, against the default compile
            yield Row("gpu_check", "1.1B PPO-ptx iteration, XLA command buffers vs the default compile",
                      graphs["iteration_s"], ppo["iteration_s"], unit="s", higher_is_better=False)


EXTRACTORS: dict[str, Callable[[Mapping[str, Any]], Iterator[Row]]] = {
    "generation": _generation, "train_step": _train_step, "ppo_step": _ppo_step, "roofline": _roofline,
    "scaling": _scaling, "gpu_check": _gpu_check,
    "ppo_step_gpu": lambda d: _ppo_step(d, "ppo_step_gpu"),
}


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """Rows of every benchmark in ``results`` (benchmark name -> its JSON), in the given order."""
    return [row for name, data in results.items() for row in EXTRACTORS[name](data)]


def summary_table(rows: list[Row]) -> str:
    return format_table(HEADERS, [r.cells() for r in rows])
