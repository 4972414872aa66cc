"""Training-free routing interventions at inference: steering toward English task experts, and
switching experts or neurons off.

    sara steer identify --model PATH --task_data task.jsonl --output spec.json
    sara steer deactivate --model PATH --source runs/neurons/neurons.json --langs sw --output off.json

- `steer`: `sara steer identify` finds task experts and writes a spec; `steering()` biases the
  routers while a model runs (hooks, no model source patched).
- `deactivate`: `sara steer deactivate` writes a spec that masks experts (router logit -> -inf
  before top-k, through `steering()`) or zeroes expert neurons (hooks), from `sara neurons` or
  `sara steer identify` output; `sara eval --deactivate` applies it.

May import the core (`routing`), `architectures`, `data`, `runtime` (deactivate reads `sara neurons`
output as JSON); `evaluation` imports it to apply a spec, never the other way round.
"""

from __future__ import annotations

from sara_moe.runtime.options import dispatch


def steer_cli(argv=None) -> int:
    # imported on use: the dispatch sits above both sub-verbs (deactivate imports steer)
    from sara_moe.steering import steer
    from sara_moe.steering.deactivate import deactivate_cli

    return dispatch("sara steer", steer.__doc__.split("\n\n")[0], {
        "identify": ("find the task experts and write a steering spec", steer.identify_cli),
        "deactivate": ("write a spec that masks experts or zeroes neurons at inference", deactivate_cli)}, argv)
