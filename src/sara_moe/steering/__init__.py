"""Training-free routing interventions at inference: router steering toward English task experts.

- `steer`: `sara steer identify` finds task experts and writes a spec; `steering()` biases the
  routers while a model runs (hooks, no model source patched).

May import the core (`routing`), `architectures`, `data`, `runtime`; `evaluation` imports it
to apply a spec, never the other way round.
"""
