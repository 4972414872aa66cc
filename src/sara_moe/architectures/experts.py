"""Where the neurons of a model's MLPs are: routed experts, shared experts and dense MLP layers.

    from sara_moe.architectures.experts import mlp_sites, expert_inputs, gate_preactivation, fires
    sites = mlp_sites(model)        # [MlpSite(layer=1, kind="routed", ...), MlpSite(layer=1, kind="shared"), ...]
    site = sites[0]
    pre = gate_preactivation(site, hidden, expert=3)     # [tokens, neurons]: the gate branch before its activation
    on = fires(site, pre)                                # bool [tokens, neurons]: the activation is > 0

A *neuron* is one intermediate unit of a gated MLP `down(act(gate(x)) * up(x))`; it *fires* on a
token when its gate activation is positive (LAPE's definition, Tang et al. 2024, for SiLU/GELU gates:
`act(g) > 0`). The facts per family live here, so analysis code has none:

- **routed experts** are transformers 5's fused experts module (`gate_up_proj [E, 2I, H]`,
  `down_proj [E, H, I]`, the `use_experts_implementation` layout flags `is_transposed`,
  `is_concatenated`, `has_bias`, `has_gate`), called as `experts(hidden_states, top_k_index,
  top_k_weights)` by every MoE block of Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, GLM4-MoE,
  PhiMoE and GPT-OSS. They are read with a forward hook on that module: its inputs say which
  tokens each expert gets, and the gate branch is recomputed from its weights (`gate_preactivation`),
  so every `experts_implementation` (eager, batched_mm, grouped_mm) is read the same way and no
  model code is patched. The activation is the module's `act_fn`, or GPT-OSS's clamped
  `gate * sigmoid(alpha * gate)` (no `act_fn`; positive exactly when the clamped gate is).
- **shared experts** (`shared_expert` of Qwen2-MoE, `shared_experts` of DeepSeek/GLM4) and
  **dense MLP layers** (DeepSeek/GLM4's `first_k_dense_replace` layers) are `gate_proj`/`up_proj`/
  `down_proj` Linear modules: their gate branch is the output of `gate_proj` (a forward hook), and
  every token passes through them.
- **sorted experts** (JetMoE's `JetMoeParallelExperts` `input_linear`/`output_linear`, fed the
  tokens sorted by expert and split by `expert_size`): a forward hook on the router keeps which token
  each sorted row is (`batch_index`) and how many rows each expert gets, and a forward hook on
  `input_linear` reads the gate half of its output; zeroing is a forward pre-hook on `output_linear`.
- anything else is refused in one line naming the model and the class (`mlp_sites`).

`watch_routed(site, callback)` hides the two routed layouts: it calls `callback(expert, tokens,
pre)` for every expert a forward hits; `zeroing_hooks(site, targets)` zeroes neurons in either
layout (a correction hook on fused experts, whose intermediate activations never leave the module:
it subtracts exactly what those neurons added, `weight × act_J(x) @ down[:, J]`, which is zeroing them
since the output is linear in the activations), or in a dense/shared MLP (a pre-hook on `down_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from sara_moe.architectures import discover_routers, model_source, num_hidden_layers, text_config

ROUTED, SHARED, DENSE = "routed", "shared", "dense"
SHARED_NAMES = ("shared_experts", "shared_expert")


@dataclass
class MlpSite:
    """The MLP neurons at one place of one decoder layer (`kind`: routed, shared or dense)."""

    layer: int
    kind: str
    name: str
    module: nn.Module  # the fused experts module, or the gated MLP (its gate_proj/up_proj/down_proj)
    num_experts: int  # 1 for shared and dense MLPs
    num_neurons: int
    block: nn.Module | None = field(default=None, repr=False)  # the MoE block holding the experts
    layout: str = "fused"  # routed experts: "fused" (gate_up_proj [E, 2I, H]) or "sorted" (JetMoE)


def _is_fused_experts(module) -> bool:
    weight = getattr(module, "gate_up_proj", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 3 and getattr(module, "has_gate", False)
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def _is_sorted_experts(block) -> bool:
    linear = getattr(block, "input_linear", None)
    return (isinstance(getattr(linear, "weight", None), torch.Tensor) and linear.weight.dim() == 3
            and hasattr(block, "output_linear") and hasattr(block, "activation") and hasattr(block, "router"))


def _is_gated_mlp(module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))


def _decoder_layers(model) -> list[nn.Module]:
    depth = num_hidden_layers(model)
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return list(module)
    raise ValueError(f"{model_source(model)}: no list of {depth} decoder layers found; sara neurons cannot "
                     "place its MLPs")


def mlp_sites(model) -> list[MlpSite]:
    """Every routed-expert, shared-expert and dense MLP site of `model`, by decoder layer.

    Raises ValueError (one line naming the model and its expert class) where a MoE layer's experts
    are not a fused gated-experts module this file reads without patching.
    """
    blocks = {site.layer: site.parent for site in discover_routers(model)}
    model_type = getattr(text_config(model), "model_type", "")
    sites: list[MlpSite] = []
    for index, layer in enumerate(_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if index in blocks:
            block = blocks[index]
            experts = getattr(block, "experts", None)
            if _is_sorted_experts(block):
                weight = block.input_linear.weight
                sites.append(MlpSite(index, ROUTED, f"layers.{index}.mlp", block, int(weight.shape[0]),
                                     int(weight.shape[1]) // 2, block, "sorted"))
                continue
            if not _is_fused_experts(experts):
                found = type(experts).__name__ if experts is not None else type(block).__name__
                raise ValueError(f"{model_source(model)} (model_type={model_type!r}): its experts ({found}) are not a "
                                 "fused gated-experts module (gate_up_proj [E, 2I, H] called with hidden_states, "
                                 "top_k_index, top_k_weights, or JetMoE's sorted experts), so sara neurons cannot read them "
                                 "without patching")
            sites.append(MlpSite(index, ROUTED, f"layers.{index}.mlp.experts", experts, int(experts.gate_up_proj.shape[0]),
                                 _intermediate(experts), block))
            for name in SHARED_NAMES:
                shared = getattr(block, name, None)
                if shared is not None and _is_gated_mlp(shared):
                    sites.append(MlpSite(index, SHARED, f"layers.{index}.mlp.{name}", shared, 1,
                                         shared.gate_proj.out_features, block))
        elif mlp is not None and _is_gated_mlp(mlp):
            sites.append(MlpSite(index, DENSE, f"layers.{index}.mlp", mlp, 1, mlp.gate_proj.out_features))
    return sites


def _intermediate(experts) -> int:
    return int(experts.down_proj.shape[1 if getattr(experts, "is_transposed", False) else 2])


def _gate_rows(experts, expert: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The expert's gate projection as `[I, H]` and its bias `[I]` (or None)."""
    weight = experts.gate_up_proj[expert]
    if getattr(experts, "is_transposed", False):
        weight = weight.t()  # stored [H, 2I]
    bias = experts.gate_up_proj_bias[expert] if getattr(experts, "has_bias", False) else None
    if getattr(experts, "is_concatenated", True):  # [gate; up]
        half = weight.shape[0] // 2
        return weight[:half], None if bias is None else bias[:half]
    return weight[0::2], None if bias is None else bias[0::2]  # interleaved gate0, up0, gate1, ...


def gate_preactivation(site: MlpSite, hidden: torch.Tensor, expert: int = 0) -> torch.Tensor:
    """`[tokens, I]` gate branch of `expert` at a routed site on `hidden [tokens, H]`, recomputed from its weights."""
    weight, bias = _gate_rows(site.module, expert)
    return F.linear(hidden.to(weight.dtype), weight, bias)


def intermediate(site: MlpSite, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """`[tokens, I]` input of `expert`'s down projection (act(gate) * up, the module's own gate function)."""
    experts = site.module
    weight = experts.gate_up_proj[expert]
    bias = experts.gate_up_proj_bias[expert] if getattr(experts, "has_bias", False) else None
    x = hidden.to(weight.dtype)
    out = x @ weight if getattr(experts, "is_transposed", False) else F.linear(x, weight)
    return experts._apply_gate(out if bias is None else out + bias)


def down_columns(site: MlpSite, expert: int, neurons: torch.Tensor) -> torch.Tensor:
    """`[len(neurons), H]`: what each of these neurons of `expert` adds to the output per unit of its activation."""
    down = site.module.down_proj[expert]
    return down[neurons] if getattr(site.module, "is_transposed", False) else down[:, neurons].t()


def has_post_expert_norm(site: MlpSite) -> bool:
    """A norm after the down projection makes an expert's output non-linear in its neurons."""
    return bool(getattr(site.module, "has_post_expert_norm", False))


def fires(site: MlpSite, pre: torch.Tensor) -> torch.Tensor:
    """bool, same shape as the gate pre-activation `pre`: the neuron's activation is positive."""
    module = site.module
    act = getattr(module, "activation" if site.layout == "sorted" else "act_fn", None)
    if act is not None:
        return act(pre) > 0
    limit, alpha = getattr(module, "limit", None), getattr(module, "alpha", None)
    if limit is not None and alpha is not None:  # GPT-OSS: glu = clamp(g, max=limit) * sigmoid(alpha * g)
        gate = pre.clamp(max=limit)
        return gate * torch.sigmoid(gate * alpha) > 0
    raise ValueError(f"{site.name} ({type(module).__name__}): no activation function to tell when a neuron fires")


def experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) from a fused experts module's call."""
    values = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    index = next(t for t in tensors if not t.is_floating_point())
    floats = [t for t in tensors if t.is_floating_point()]
    hidden, weights = floats[0], floats[1]
    index = index.reshape(-1, index.shape[-1])
    return hidden.reshape(-1, hidden.shape[-1]), index, weights.reshape(index.shape)


def expert_inputs(site: MlpSite, args: tuple, kwargs: dict):
    """Per expert hit by this call: (expert, token positions, slot positions), from the experts module's inputs."""
    hidden, index, _weights = experts_call(args, kwargs)
    for expert in torch.unique(index).tolist():
        if 0 <= expert < site.num_experts:  # an expert-parallel sentinel (== E) is no expert
            tokens, slots = torch.where(index == expert)
            yield expert, tokens, slots


def watch_routed(site: MlpSite, callback) -> list:
    """Forward hooks calling `callback(expert, tokens [n], pre [n, I])` for every expert a forward of the
    routed `site` hits (`tokens`: rows of the flattened batch); returns the handles to remove."""
    if site.layout == "sorted":
        seen = {}

        def routed(module, args, output):  # JetMoeTopKGating: (sorted slots, batch_index, gates, expert_size, logits)
            seen["tokens"], seen["sizes"] = output[1], output[3]

        def gate_out(module, args, output):
            half = output.shape[-1] // 2
            for expert, (tokens, rows) in enumerate(zip(seen["tokens"].split(seen["sizes"]),
                                                        output.split(seen["sizes"]))):
                if tokens.numel():
                    callback(expert, tokens, rows[:, :half])

        return [site.module.router.register_forward_hook(routed),
                site.module.input_linear.register_forward_hook(gate_out)]

    def fused(module, args, kwargs, output):
        hidden = experts_call(args, kwargs)[0]
        for expert, tokens, _slots in expert_inputs(site, args, kwargs):
            callback(expert, tokens, gate_preactivation(site, hidden[tokens], expert))

    return [site.module.register_forward_hook(fused, with_kwargs=True)]


def zeroing_hooks(site: MlpSite, targets: list[tuple[int, list[int]]]) -> list:
    """Hooks that zero the neurons `targets` = [(expert, [neuron, ...]), ...] of `site`; returns the handles."""
    if site.kind != ROUTED:
        ids = torch.as_tensor(sorted({n for _e, neurons in targets for n in neurons}), dtype=torch.long)

        def dense(module, args):
            x = args[0].clone()
            x[..., ids.to(x.device)] = 0
            return (x, *args[1:])

        return [site.module.down_proj.register_forward_pre_hook(dense)]
    cached = [(expert, torch.as_tensor(ids, dtype=torch.long)) for expert, ids in targets]
    if site.layout == "sorted":
        def sorted_rows(module, args):  # JetMoeParallelExperts(inputs sorted by expert, expert_size)
            x, sizes = args[0].clone(), args[1]
            starts = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
            for expert, ids in cached:
                x[starts[expert]:starts[expert + 1], ids.to(x.device)] = 0
            return (x, *args[1:])

        return [site.module.output_linear.register_forward_pre_hook(sorted_rows)]
    if has_post_expert_norm(site):
        raise ValueError(f"{site.name} has a norm after its down projection; its neurons cannot be zeroed by a hook")

    def correction(module, args, kwargs, output):
        hidden, index, weights = experts_call(args, kwargs)
        flat = output.reshape(-1, output.shape[-1])
        for expert, ids in cached:
            tokens, slots = torch.where(index == expert)
            if tokens.numel() == 0:
                continue
            ids = ids.to(hidden.device)
            act = intermediate(site, hidden[tokens], expert)[:, ids]
            delta = (act @ down_columns(site, expert, ids)) * weights[tokens, slots, None].to(act.dtype)
            flat = flat.index_add(0, tokens, -delta.to(flat.dtype))
        return flat.reshape(output.shape)

    return [site.module.register_forward_hook(correction, with_kwargs=True)]
