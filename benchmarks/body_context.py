"""One policy, many bodies: the flywheel's model-based learner pooled over the four demo bodies,
with a body-conditioned policy (``sac.body_context``, the flywheel's default) vs one that reads
only the observation.

Both arms: the model-based learner's defaults (``policies.mbpo.default_config``), one world per
body (nominal, 2 kg payload, half-strength motor, noisy biased sensor), the flywheel's
sensor-noise rule (``robust_to_fleet_sensors``), the same seeds and real-step budget; each policy
evaluated on every body (6 fixed-seed 1,000-step episodes) at 1/3, 2/3 and all of the budget.
Lines: per body, the conditioned policy's return at the budget against the unconditioned one's
(median over seeds), and the worst body's. Each seed's curves are cached as JSON under
``runs/benchmarks/body_context/`` (``--fresh`` ignores them), so seeds may run in separate processes.

Run: `.venv/bin/python benchmarks/body_context.py [--steps 3000] [--seeds 0 1 2]`
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path


sys.path.insert(0, os.path.dirname(__file__))
from common import cached_json, emit, pooled_seed_args  # noqa: E402

from fleet.pipeline.simfleet import CONDITIONS  # noqa: E402
from fleet.pipeline.steps import body_conditioned, robust_to_fleet_sensors  # noqa: E402
from policies.evaluate import evaluate  # noqa: E402
from policies.mbpo import default_config  # noqa: E402
from policies.trainer import Trainer, make_algorithm  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402

ROBOT = "pendulum"
FLEET = ["nominal", "heavy_payload", "weak_motor", "noisy_sensor"]
CACHE = Path("runs/benchmarks/body_context")


def curve(steps: int, seed: int, conditioned: bool) -> list[tuple[int, list[float]]]:
    """(real steps, mean return per body) at a third, two thirds and all of ``steps``."""
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    config, algo = default_config(ROBOT, total_env_steps=steps, seed=seed)
    config = dataclasses.replace(config, num_worlds=len(profiles))
    algo = robust_to_fleet_sensors(body_conditioned(algo) if conditioned else algo, {str(i): p for i, p in enumerate(profiles)})
    out = []
    with Trainer(config, make_algorithm(config, algo), profiles=profiles) as trainer:
        for k in (1, 2, 3):
            trainer.local_target = steps * k // 3
            trainer.train()
            out.append((trainer.env_steps, [p.mean_return for p in evaluate(trainer.algo.policy, ROBOT, profiles, 6, seed=123).profiles]))
    return out


def cached(steps: int, seed: int, conditioned: bool, fresh: bool) -> list:
    path = CACHE / f"steps{steps}-seed{seed}-{'conditioned' if conditioned else 'plain'}.json"
    return cached_json(path, lambda: curve(steps, seed, conditioned), fresh)


def main() -> None:
    args = pooled_seed_args(__doc__)
    runs = {arm: [cached(args.steps, seed, arm, args.fresh) for seed in args.seeds] for arm in (True, False)}
    med = lambda values: float(statistics.median(values))  # noqa: E731
    for arm, name in ((True, "conditioned"), (False, "plain")):
        for seed, c in zip(args.seeds, runs[arm]):
            print(f"# {name} seed {seed}: " + "; ".join(f"{n}: " + "/".join(f"{r:.0f}" for r in rets) for n, rets in c), file=sys.stderr)
    final = {arm: [c[-1][1] for c in runs[arm]] for arm in runs}  # per seed: the returns per body at the budget
    for i, body in enumerate(FLEET):
        a, b = med([r[i] for r in final[True]]), med([r[i] for r in final[False]])
        emit(f"body_context/{body}/return_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)
    a, b = med([min(r) for r in final[True]]), med([min(r) for r in final[False]])
    emit(f"body_context/worst_body/return_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)


if __name__ == "__main__":
    main()
