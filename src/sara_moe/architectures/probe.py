"""Which scoring rule a loaded MoE model really routes with, read off its own dispatch weights.

    from sara_moe.architectures.probe import scoring_verdict
    verdict = scoring_verdict(model, sites)   # ScoringVerdict(rule="sigmoid", evidence=..., ...)

`architectures.find_routers` calls this once per process for each (model type, router class,
transformers version, scoring fields of the config); every stage then reads `site.scoring`.
`clear_scoring_cache()` forgets the verdicts (a model patched in place after it was probed).

The probe runs one short forward (eval mode, no grad, random token ids) and captures, for
every router, (a) the output slot sara-moe reads and (b) the weights the MoE block actually
hands to its experts: the `(top_k_index, top_k_weights)` pair the experts module receives
(found by a pre-hook on the modules beside the router, so a post-processing step between
router and experts such as DeepSeek-V3's renormalisation and `routed_scaling_factor` is
seen), else the router's own returned weights/indices, else a dense `[N, E]` score tensor
that is zero outside the selected experts (Llama4). A rule maps the read slot to a score per
expert (`softmax`: softmax over all experts; `sigmoid`: sigmoid, which `to_probabilities`
normalises over experts; `probs`: the slot already holds probabilities). A rule reproduces
the dispatch when, for every token, `dispatched weight / rule score` is the same for all of
its selected experts (renormalisation over the top-k, a scaling factor and a selection-only
bias all keep that ratio; a different rule does not). With one expert per token the ratio
must instead be the same for all tokens. Softmax over the selected top-k only (GPT-OSS) has
exactly the ratios of the softmax over all experts, so it is reported, and aligned, as
`softmax`. If no rule, or no dispatch, can be found, the probe refuses with
`ScoringProbeError` naming the model type and router class: sara-moe never guesses.

`softmax_aux` is the one rule not read off dispatch weights. Where the dispatch follows no rule
(PhiMoE's sparsemixer hands each selected expert a softmax over a thresholded subset of the
logits, weights that are no distribution over experts), the distribution the model itself
treats as its routing is the softmax of its gate logits: its own load-balancing loss reads
exactly that. The probe then runs a second short forward with `output_router_logits=True` (eval
mode: no input jitter, no Gumbel sampling) and keeps `softmax_aux` only if (a) the model's
`aux_loss` equals the Switch-Transformer loss recomputed here from the captured slot's softmax
and the experts actually dispatched (`aux_loss_by_hand`), and (b) every token's dispatched
experts are a top-k of that softmax. Either failing, or no `aux_loss`, refuses as before. What
a training-mode forward sees: the router's input is scaled by uniform noise of width
`input_jitter_noise` (0 in transformers' default config; a checkpoint's config.json may set it)
and the experts are Gumbel-sampled from the thresholded softmax, so later layers see sampled
experts. The aligned term reads the softmax of that forward's own logits, as its aux loss does
(which counts that softmax's top-k, not the sampled experts). Priors and online anchors
(without `online_anchor_grad`) are taken in eval mode: no jitter, no sampling.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

RULES = ("softmax", "sigmoid", "probs")  # always tried; a config may name one more activation (see score)
AUX_RULE = "softmax_aux"  # softmax of the logits, verified through the model's aux loss (module docstring)
DISTRIBUTION_RULES = ("softmax", AUX_RULE, "probs")  # `score` already gives a distribution over experts
# log-ratio tolerance by the dtype the dispatch weights were computed in
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_SCORING_FIELD = re.compile(r"scor|gating_func|router_act|route_act|gate_act")
_PROBE_TOKENS = (2, 12)  # batch, sequence: enough tokens to tell the rules apart, cheap on a big model

_CACHE: dict[tuple, "ScoringVerdict"] = {}


class ScoringProbeError(RuntimeError):
    """The loaded model's dispatch weights follow none of the rules sara-moe can align."""


@dataclass(frozen=True)
class ScoringVerdict:
    rule: str  # "softmax" | "sigmoid" | "probs" | "softmax_aux" | a config-named activation
    evidence: str  # what the rule was checked against
    max_error: float  # worst log-ratio mismatch of the winning rule
    selection_bias: bool  # router carries a selection-only bias (e_score_correction_bias)
    declared: str | None  # rule named by the config's scoring fields, if any
    key: tuple

    def as_dict(self) -> dict:
        return {"rule": self.rule, "evidence": self.evidence, "max_error": self.max_error,
                "selection_bias": self.selection_bias, "declared": self.declared,
                "transformers_version": self.key[2]}


def score(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-expert fp32 scores of a router output under `rule`.

    `softmax` (and `softmax_aux`, the same scores) and `probs` are distributions already; any
    other rule is an elementwise activation (`sigmoid`, or one a config names, e.g. DeepSeek-V4's
    `sqrtsoftplus`, looked up in transformers' ACT2FN) that `to_probabilities` normalises over experts.
    """
    scores = scores.float()
    if rule in ("softmax", AUX_RULE):
        return torch.softmax(scores, dim=-1)
    if rule == "probs":
        return scores
    # Below -80 a sigmoid-like score is < 1e-34 (never a selected expert); flooring there keeps
    # sqrt(softplus(x)) from a 0 * inf = nan gradient where softplus underflows to 0.
    scores = scores.clamp_min(-80.0)
    if rule == "sigmoid":
        return torch.sigmoid(scores)
    from transformers.activations import ACT2FN

    if rule in ACT2FN:
        return ACT2FN[rule](scores)
    raise ValueError(f"unknown scoring rule {rule!r}; expected one of {RULES} or an activation in ACT2FN")


def declared_rule(text_config) -> tuple[str | None, tuple]:
    """The rule the config names (a `scoring_func`-like string field) and the fields it came from."""
    fields = []
    for name, value in sorted(vars(text_config).items()):
        if isinstance(value, str) and _SCORING_FIELD.search(name):
            fields.append((name, value))
    from transformers.activations import ACT2FN

    for _, value in fields:
        if value in RULES or value in ACT2FN:
            return value, tuple(fields)
    return None, tuple(fields)


def _dispatch_from_call(values, rows: int, num_experts: int):
    """An `(indices [rows, k], weights [rows, k])` pair among a call's tensors, or None."""
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.numel() and v.numel() % rows == 0]
    ints = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    floats = [t for t in tensors if t.is_floating_point()]
    for idx in ints:
        idx2 = idx.reshape(rows, -1)
        if idx2.shape[1] > num_experts or idx2.min() < 0 or idx2.max() >= num_experts:
            continue
        for w in floats:
            if w.numel() == idx.numel() and w is not idx:
                return idx2.long(), w.reshape(rows, -1)
    return None


def _dense_dispatch(values, rows: int, num_experts: int, read: torch.Tensor):
    """A dense `[rows, E]` weight tensor that is zero outside the selected experts (Llama4 style)."""
    for t in values:
        if (isinstance(t, torch.Tensor) and t is not read and t.is_floating_point()
                and t.numel() == rows * num_experts):
            dense = t.reshape(rows, num_experts).float()
            active = dense != 0
            k = int(active.sum(-1).max())
            if 0 < k < num_experts and bool((active.sum(-1) == k).all()):
                idx = dense.abs().topk(k, dim=-1).indices
                return idx, t.reshape(rows, num_experts).gather(1, idx)
    return None


def _grouped_dispatch(values, rows: int, num_experts: int):
    """Dispatch grouped by expert (JetMoE's sorted dispatch: per-expert slot counts as a list of ints,
    the token of every slot, each slot's weight), regrouped per token as `(indices [rows, k], weights)`."""
    counts = next((v for v in values if isinstance(v, (list, tuple)) and len(v) == num_experts
                   and all(isinstance(c, int) for c in v)), None)
    total = sum(counts) if counts is not None else 0
    if not total or total % rows:
        return None
    k = total // rows
    flat = [v for v in values if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == total]
    # the slot -> token index holds every token k times (a slot permutation would exceed rows when k > 1)
    tokens = next((t for t in flat if not t.is_floating_point() and 0 <= int(t.min()) and int(t.max()) < rows
                   and bool((torch.bincount(t, minlength=rows) == k).all())), None)
    weights = next((t for t in flat if t.is_floating_point()), None)
    if tokens is None or weights is None:
        return None
    experts = torch.repeat_interleave(torch.arange(num_experts, device=tokens.device),
                                      torch.tensor(counts, device=tokens.device))
    order = torch.sort(tokens, stable=True).indices
    return experts[order].reshape(rows, k), weights[order].reshape(rows, k)


class _Capture:
    """Hooks that capture, per router, the read slot and the dispatched weights of one forward."""

    def __init__(self, sites):
        self.read: dict[str, torch.Tensor] = {}
        self.router_out: dict[str, tuple] = {}
        self.expert_calls: dict[str, list[list[torch.Tensor]]] = {}
        self.handles = []
        for site in sites:
            self.handles.append(site.module.register_forward_hook(self._router_hook(site)))
            # modules inside the router are hooked too: a registered "router" may be a whole MoE block
            for module in site.parent.modules() if site.parent is not None else []:
                if module is not site.module and module is not site.parent:
                    self.handles.append(module.register_forward_pre_hook(self._expert_hook(site), with_kwargs=True))

    def _router_hook(self, site):
        def hook(_module, _inputs, output):
            outputs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            if site.name not in self.read:
                read = outputs[site.logits_index]
                self.read[site.name] = read.detach().reshape(-1, read.shape[-1])
                self.router_out[site.name] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        return hook

    def _expert_hook(self, site):
        # Kept before the router's output is known: a registered "router" that is a whole MoE block
        # returns its scores only after its experts ran. `dispatch` checks shapes afterwards.
        def hook(_module, args, kwargs):
            calls = self.expert_calls.setdefault(site.name, [])
            tensors = [t.detach() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
            if len(calls) < 8 and any(not t.is_floating_point() for t in tensors):
                calls.append(tensors)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def dispatch(self, site):
        """(indices, weights, where they came from) for one router, or None."""
        read = self.read.get(site.name)
        if read is None:
            return None
        for tensors in self.expert_calls.get(site.name, []):
            found = _dispatch_from_call(tensors, *read.shape)
            if found is not None:
                return found[0], found[1], "weights the experts module receives"
        outputs = [o for i, o in enumerate(self.router_out[site.name]) if i != site.logits_index]
        found = _dispatch_from_call(outputs, *read.shape)
        if found is not None:
            return found[0], found[1], "top-k weights the router returns"
        found = _dense_dispatch(outputs, *read.shape, read)
        if found is not None:
            return found[0], found[1], "dense expert weights the router returns"
        found = _grouped_dispatch(outputs, *read.shape)
        if found is not None:
            return found[0], found[1], "expert-grouped weights the router returns"
        return None


def rule_error(read: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, rule: str) -> float:
    """Worst mismatch (in log space) between dispatched weights and the rule's scores of the same experts."""
    s = score(read.double(), rule)
    sums_to_one = torch.allclose(s.sum(-1), torch.ones_like(s[:, 0]), atol=1e-2)
    if rule == "probs" and not (bool((s >= -1e-6).all()) and sums_to_one):
        return math.inf  # the slot does not hold probabilities
    picked = s.gather(1, idx)
    w = weights.double()
    # A dispatched weight that underflowed to 0 in a low-precision dtype (bf16 weights of a router whose
    # logits span >100, seen on a random 18-layer model) says nothing about the rule, provided the rule's
    # own score for that expert is that small too; any other non-positive value is a real mismatch.
    underflow = (w <= 0) & (picked < 64 * idx.shape[1] * torch.finfo(weights.dtype).smallest_normal)
    if bool(((picked <= 0) | (w <= 0))[~underflow].any()):
        return math.inf
    keep = ~underflow
    ratio = torch.where(keep, w.clamp_min(1e-300).log() - picked.clamp_min(1e-300).log(), 0.0)  # [N, k]
    if ratio.shape[1] >= 2:  # constant per token iff the rule reproduces the weights
        spread = (torch.where(keep, ratio, -math.inf).max(1).values - torch.where(keep, ratio, math.inf).min(1).values)
        spread = spread[keep.sum(1) >= 2]
        return float(spread.max()) if spread.numel() else math.nan
    if float(w.max() - w.min()) <= 1e-6 * float(w.abs().max()):
        return math.nan  # one expert at a constant weight (top-1 renormalised): says nothing about the rule
    return float(ratio.max() - ratio.min())


def _model_identity(model) -> tuple[str, object]:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", "") or getattr(config, "model_type", "") or "", text


def _probe_forward(model, **extra):
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings if hasattr(embeddings, "num_embeddings") else embeddings.weight.shape[0]
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(4, vocab - 1), vocab, _PROBE_TOKENS, generator=generator).to(device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        model.train(was_training)


def aux_loss_by_hand(reads: list[torch.Tensor], dispatched: list[torch.Tensor]) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss transformers' MoE models return as `aux_loss`, from
    each router's logits `[N, E]` and the experts each token was dispatched to `[N, k]` (no padding).

    `E * sum_e f_e * P_e`, where over all routers' rows together `f_e` is the share of rows whose
    dispatched experts include e (k counts per row) and `P_e` the mean softmax probability of e.
    The softmax is taken in the logits' dtype and summed in fp32, as transformers does.
    """
    experts = reads[0].shape[-1]
    counts = torch.zeros(experts, dtype=torch.float64)
    probs = torch.zeros(experts, dtype=torch.float64)
    rows = 0
    for read, idx in zip(reads, dispatched):
        counts += torch.bincount(idx.reshape(-1).cpu(), minlength=experts).double()
        probs += torch.softmax(read, dim=-1).float().sum(0).double().cpu()
        rows += read.shape[0]
    return experts * ((counts / rows) * (probs / rows)).sum()


def _not_topk(read: torch.Tensor, idx: torch.Tensor) -> int:
    """Rows whose dispatched experts are not a top-k of the logits (ties count as top-k)."""
    scores = read.double()
    picked = scores.gather(1, idx).min(1).values
    others = scores.scatter(1, idx, -math.inf).max(1).values
    return int((picked < others).sum())


def _aux_loss_verdict(model, sites, tolerance: float) -> tuple[float | None, str]:
    """(relative aux-loss error, evidence) when `softmax_aux` holds on `model`, else (None, why not)."""
    capture = _Capture(sites)
    try:
        output = _probe_forward(model, output_router_logits=True)
    except Exception as exc:  # noqa: BLE001 - a model whose forward takes no output_router_logits
        return None, f"a forward with output_router_logits=True failed ({type(exc).__name__})"
    finally:
        capture.remove()
    aux = getattr(output, "aux_loss", None)
    if not isinstance(aux, torch.Tensor):
        return None, "the model returns no aux_loss with output_router_logits=True"
    reads, dispatched = [], []
    for site in sites:
        found = capture.dispatch(site)
        if found is None:
            return None, f"no dispatched experts captured at {site.name}"
        reads.append(capture.read[site.name])
        dispatched.append(found[0])
    off = sum(_not_topk(read, idx) for read, idx in zip(reads, dispatched))
    if off:
        return None, f"{off} tokens are dispatched to experts that are not the top-k of the softmax in eval mode"
    want = aux_loss_by_hand(reads, dispatched)
    error = abs(float(aux) - float(want)) / max(abs(float(want)), 1e-12)
    if not error <= tolerance:
        return None, (f"the model's aux_loss {float(aux):.6g} is not the load-balancing loss of the softmax and the "
                      f"dispatched experts ({float(want):.6g})")
    return error, (f"{AUX_RULE}: the model's own aux_loss equals the load-balancing loss of the softmax and the "
                   f"dispatched experts (relative error {error:.2g}), which are its top-k in eval mode "
                   f"({len(sites)} routers); the dispatch weights themselves follow no rule")


def clear_scoring_cache() -> int:
    """Forget every cached verdict, so the next `find_routers` probes again; returns how many were held."""
    held = len(_CACHE)
    _CACHE.clear()
    return held


def model_source(model: nn.Module) -> str:
    """The model as the user named it (its directory or hub id, `config._name_or_path`), else its class:
    every refusal of a model starts with this, so the line says which model it is about."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{source} ({type(model).__name__})" if source else type(model).__name__


def scoring_verdict(model: nn.Module, sites) -> ScoringVerdict:
    """The rule `model`'s routers score with, verified on its dispatch weights (cached per process)."""
    import transformers

    model_type, text_config = _model_identity(model)
    router_cls = type(sites[0].module)
    declared, fields = declared_rule(text_config) if text_config is not None else (None, ())
    selection_bias = any(isinstance(getattr(s.module, "e_score_correction_bias", None), torch.Tensor) for s in sites)
    key = (model_type, f"{router_cls.__module__}.{router_cls.__qualname__}", transformers.__version__, fields)
    if key in _CACHE:
        return _CACHE[key]
    where = f"{model_source(model)}: model_type={model_type!r}, router class {router_cls.__name__}"
    capture = _Capture(sites)
    try:
        _probe_forward(model)
    except Exception as exc:  # the probe must name the model, not leave a bare traceback
        raise ScoringProbeError(f"{where}: the scoring probe forward failed ({type(exc).__name__}: {exc}); "
                                "sara-moe cannot verify how this model routes") from exc
    finally:
        capture.remove()
    candidates = RULES + ((declared,) if declared and declared not in RULES else ())
    errors = {rule: math.nan for rule in candidates}
    evidence, tolerance, checked = set(), 0.0, 0
    for site in sites:
        found = capture.dispatch(site)
        if found is None:
            continue
        idx, weights, source = found
        read = capture.read[site.name]
        tolerance = max(tolerance, *(_TOLERANCE.get(t.dtype, 6e-2) for t in (weights, read)))
        evidence.add(source)
        checked += 1
        for rule in candidates:  # the worst router counts; nan (uninformative) only where all are
            err = rule_error(read, idx, weights, rule)
            if math.isnan(errors[rule]) or err > errors[rule]:
                errors[rule] = err
    if not checked:
        raise ScoringProbeError(f"{where}: no dispatch weights could be captured (neither an experts module "
                                "receiving (top_k_index, top_k_weights) nor router-returned weights); "
                                "sara-moe refuses rather than guess the scoring rule (docs/architectures.md lists "
                                "the families it aligns)")
    if all(math.isnan(e) for e in errors.values()):
        if declared is None:
            raise ScoringProbeError(f"{where}: every token is dispatched to one expert at a constant weight, which "
                                    "cannot tell the scoring rule apart and the config names none; sara-moe refuses "
                                    "rather than guess (docs/architectures.md lists the families it aligns)")
        errors[declared], evidence = 0.0, {"config field only (constant top-1 dispatch weights)"}
    matching = [rule for rule in candidates if errors[rule] <= tolerance]
    if not matching:
        shown = ", ".join(f"{r}: {e:.3g}" for r, e in errors.items())
        aux_error, aux_evidence = _aux_loss_verdict(model, sites, tolerance)
        if aux_error is None:
            raise ScoringProbeError(f"{where}: the dispatched expert weights follow none of the rules {candidates} "
                                    f"(worst log-ratio error {shown}; tolerance {tolerance:g}) and {AUX_RULE} does "
                                    f"not hold ({aux_evidence}); sara-moe refuses rather than align the wrong "
                                    "distribution (docs/architectures.md lists the families it aligns)")
        verdict = ScoringVerdict(AUX_RULE, aux_evidence, aux_error, selection_bias, declared, key)
        _CACHE[key] = verdict
        return verdict
    # Rules can coincide (a sigmoid of very negative logits has softmax ratios): the config decides then.
    rule = declared if declared in matching else matching[0]
    note = f"; also fits {', '.join(r for r in matching if r != rule)}" if len(matching) > 1 else ""
    verdict = ScoringVerdict(rule, f"{' + '.join(sorted(evidence))} ({checked} routers{note})", errors[rule],
                             selection_bias, declared, key)
    _CACHE[key] = verdict
    return verdict
