"""``simulate(plan)``: build the stages of the plan's workload, schedule them, summarise, export a Timeline."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from specplan.contracts.plan import Plan, Prediction
from specplan.contracts.timeline import Timeline
from specplan.simulator.core import Schedule, run
from specplan.simulator.report import Summary, summarise, to_timeline
from specplan.simulator.script import Script, build_script, with_workload


@dataclass
class Simulation:
    plan: Plan  # with the simulated workload
    script: Script
    schedule: Schedule
    summary: Summary

    @property
    def prediction_source(self) -> str:
        """"plan" (what the search stored) or "planner" (recomputed for an overridden workload)."""
        return "plan" if self.plan.prediction is not None else "planner"

    @cached_property
    def prediction(self) -> Prediction:
        """The planner's numbers for the simulated workload."""
        if self.plan.prediction is not None:
            return self.plan.prediction
        from specplan.planner.predict import predict

        return predict(self.plan)

    @property
    def num_ops(self) -> int:
        return len(self.schedule.start_s)

    def meta(self) -> dict[str, Any]:
        """Numbers and labels for the Timeline's ``meta`` (units in key names)."""
        p, s, wl = self.plan, self.summary, self.plan.workload
        meta: dict[str, Any] = {
            "model": p.model.name,
            "profile": p.profile.name,
            "draft": p.draft.label,
            "draft_len": p.policy.draft_len,
            "num_batches": p.policy.num_batches,
            "decode_batch": p.policy.decode_batch,
            "prompt_len": wl.prompt_len,
            "gen_len": wl.gen_len,
            "num_prompts": wl.num_prompts,
            "mode": "expected" if self.script.seed is None else "drawn",
            "seed": self.script.seed,
            "kv_step": self.script.kv_step,
            "ops": self.num_ops,
            **{k: v for k, v in s.as_dict().items() if k != "bubbles"},
        }
        pred = self.prediction
        meta.update(predicted_decode_tok_s=pred.decode_tok_s, predicted_e2e_tok_s=pred.e2e_tok_s,
                    predicted_ttft_s=pred.ttft_s, predicted_round_s=pred.round_s,
                    predicted_bottleneck=pred.bottleneck, prediction_source=self.prediction_source)
        return meta

    def timeline(self) -> Timeline:
        return to_timeline(self.schedule, self.meta())


def simulate(plan: Plan, tokens: int | None = None, prompts: int | None = None, seed: int = 0,
             expected: bool = False, kv_step: int | None = None) -> Simulation:
    """Simulate ``plan`` (``tokens`` / ``prompts`` override its gen_len / num_prompts).

    Accepted drafts and routed experts are drawn with ``seed``, or, with ``expected``, every sequence commits the
    expected tokens per round and every expert op runs for its expected time (the fluid limit the steady-state
    model describes). ``kv_step``: KV-length granularity of the programs (None: about 16 steps over the generation).
    """
    sim_plan = with_workload(plan, tokens, prompts)
    if sim_plan is not plan:
        sim_plan = sim_plan.model_copy(update={"prediction": None})  # the stored one is for another workload
    script = build_script(sim_plan, seed=None if expected else seed, kv_step=kv_step)
    schedule = run(script.stages)
    return Simulation(sim_plan, script, schedule, summarise(schedule))
