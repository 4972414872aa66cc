"""Read router distributions from an unmodified Hugging Face MoE model, with gradients.

    from sara_moe.routing import RouterRecorder
    with RouterRecorder(model) as rec:
        out = model(input_ids=ids, attention_mask=mask)
    probs = rec.probabilities(mask)      # {decoder_layer: fp32 [B, S, E]}, pads zeroed
    topk = rec.topk_probabilities(mask)  # post-top-k view: renormalised selected weights

    # training: one mean per example (segment) of a packed or padded batch, [N, layers, E]
    pooled = rec.pooled_by_segment(segments, num_segments)   # segments [B, S]: example index, -1 = skip
    # an anchor forward that ends right after the deepest recorded router (no later layer, no LM head)
    routing_forward(model, rec, ids, mask, early_exit=True)

    # analysis and the training monitor: per sequence pooled routing + dispatched slot counts per layer
    batch = pool_sequences(model, RouterRecorder(model, keep_topk=True), sequences, tokenizer)

The recorder registers forward hooks on the routers that `architectures.find_routers`
finds; it never patches model code. Hooks record only while the context is open and never
inside the autograd engine, so the second firing of every router during a non-reentrant
gradient-checkpoint recompute (which happens in `backward()`) is ignored and the recorded
tensors are the ones whose graph the loss flows through. Routers hidden behind PEFT
wrappers (LoRA on the router via `target_parameters`) are found by class, and their logits
include the LoRA delta. Rows of a router's `[B*S, E]` output are batch-major and include
pads; `attention_mask` decides which rows are real.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sara_moe import divergence as D
from sara_moe.architectures import RouterSite, experts_per_token, find_routers, to_probabilities

POOLINGS = ("all", "prompt", "response")


def _in_backward() -> bool:
    # A graph task id exists only while the autograd engine runs (checkpoint recompute).
    return torch._C._current_graph_task_id() != -1


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left-padded rows match unpadded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _is_selection(weights, indices) -> bool:
    """`(weights, indices)` look like a top-k selection: float weights and integer indices, as many of each."""
    return (isinstance(weights, torch.Tensor) and isinstance(indices, torch.Tensor) and weights.is_floating_point()
            and not indices.is_floating_point() and indices.numel() == weights.numel() and indices.dim() >= 1)


class RouterRecorder:
    """Context manager that records router outputs of selected MoE layers during forward."""

    def __init__(self, model: nn.Module, layers: list[int] | None = None, keep_topk: bool = False):
        sites = find_routers(model)
        if layers is not None:
            known = {s.layer for s in sites}
            bad = [layer for layer in layers if layer not in known]
            if bad:
                raise ValueError(f"layers {bad} hold no MoE router; MoE layers are {sorted(known)}")
            sites = [s for s in sites if s.layer in set(layers)]
        self.sites: list[RouterSite] = sites
        self.keep_topk = keep_topk
        self._k = experts_per_token(model) if keep_topk else 0
        self.scores: dict[int, torch.Tensor] = {}
        self.topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._active = False

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sites]

    def _hook(self, site: RouterSite):
        def hook(_module, _inputs, output):
            if not self._active or _in_backward():
                return
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            scores = outputs[site.logits_index]
            self.scores[site.layer] = scores.reshape(-1, scores.shape[-1])
            if self.keep_topk:
                weights, indices = (outputs[1], outputs[2]) if len(outputs) >= 3 else (None, None)
                # (scores, weights, indices) routers return their selection; others (JetMoE, whose slots
                # 1-2 are its dispatch grouped by expert) get the top-k of the aligned distribution
                if _is_selection(weights, indices):
                    self.topk[site.layer] = (weights.reshape(indices.shape[0], -1), indices)
                else:
                    top = to_probabilities(self.scores[site.layer].detach(), site.scoring).topk(self._k, dim=-1)
                    self.topk[site.layer] = (top.values, top.indices)

        return hook

    def __enter__(self) -> "RouterRecorder":
        self.clear()
        self._handles = [s.module.register_forward_hook(self._hook(s)) for s in self.sites]
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.scores, self.topk = {}, {}

    def _check(self, layer: int, rows: int) -> None:
        if layer not in self.scores:
            raise RuntimeError(f"router of layer {layer} did not fire; run the forward inside the recorder")
        if self.scores[layer].shape[0] != rows:
            raise RuntimeError(
                f"layer {layer}: router saw {self.scores[layer].shape[0]} tokens, mask has {rows}; "
                "record one forward per recorder context"
            )

    def probabilities(self, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per MoE layer, fp32 router distributions `[B, S, E]` with pad rows set to zero."""
        batch, seq = attention_mask.shape
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        result = {}
        for site in self.sites:
            self._check(site.layer, batch * seq)
            probs = to_probabilities(self.scores[site.layer], site.scoring)
            result[site.layer] = probs.view(batch, seq, -1) * mask.to(probs.device)
        return result

    def pooled_by_segment(self, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
        """fp32 `[num_segments, layers, E]`: per segment (example) the mean router distribution over its
        tokens; `segments [B, S]` holds each token's segment index, -1 for tokens left out (pads, the span
        not pooled). A segment with no token gets zeros. Layers in `self.layers` order."""
        flat = segments.reshape(-1)
        counts = segment_token_counts(segments, num_segments)  # no host sync, unlike bincount on a GPU
        weight = torch.where(flat >= 0, 1.0 / counts.clamp_min(1).index_select(0, flat.clamp_min(0)), 0.0)
        pooled = []
        for site in self.sites:
            self._check(site.layer, flat.numel())
            scores = self.scores[site.layer]
            pooled.append(SegmentMeanOfProbabilities.apply(scores, flat.to(scores.device), weight.to(scores.device),
                                                           num_segments, site.scoring))
        return torch.stack(pooled, dim=1)

    def topk_probabilities(self, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Post-top-k view: each token's selected experts with their weights renormalised to 1."""
        if not self.keep_topk:
            raise RuntimeError("construct RouterRecorder(..., keep_topk=True) for the post-top-k view")
        batch, seq = attention_mask.shape
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        result = {}
        for site in self.sites:
            self._check(site.layer, batch * seq)
            weights, indices = self.topk[site.layer]
            num_experts = self.scores[site.layer].shape[-1]
            weights = weights.float()
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
            dense = torch.zeros(indices.shape[0], num_experts, dtype=torch.float32, device=weights.device)
            dense.scatter_add_(1, indices.long(), weights)
            result[site.layer] = dense.view(batch, seq, -1) * mask.to(dense.device)
        return result


def segment_token_counts(segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """fp32 `[num_segments]`: how many tokens of `segments` (-1 = none) each segment has."""
    flat = segments.reshape(-1)
    counts = torch.zeros(num_segments, dtype=torch.float32, device=flat.device)
    return counts.index_add_(0, flat.clamp_min(0), (flat >= 0).to(torch.float32))


class SegmentMeanOfProbabilities(torch.autograd.Function):
    """Per-segment weighted sum of `to_probabilities(scores)`, saving only `scores` for backward.

    Autograd on the plain expression would keep the fp32 distribution of every token of every
    aligned layer until backward (the softmax's output), plus masked fp32 copies while pooling;
    here the distribution exists one layer at a time and is recomputed from the logits in backward.
    The gradient is autograd's own (the recompute runs under `enable_grad`), so any scoring rule works.
    """

    @staticmethod
    def forward(ctx, scores, segments, weight, num_segments: int, scoring: str):
        probs = to_probabilities(scores.detach(), scoring)
        pooled = torch.zeros(num_segments, probs.shape[-1], dtype=probs.dtype, device=probs.device)
        pooled.index_add_(0, segments.clamp_min(0), probs * weight.unsqueeze(-1).to(probs.dtype))
        ctx.save_for_backward(scores, segments, weight)
        ctx.scoring = scoring
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        scores, segments, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaf = scores.detach().requires_grad_(True)
            probs = to_probabilities(leaf, ctx.scoring)
            per_token = grad_pooled.index_select(0, segments.clamp_min(0)) * weight.unsqueeze(-1).to(probs.dtype)
            (grad_scores,) = torch.autograd.grad(probs, leaf, per_token)
        return grad_scores, None, None, None, None


class _ForwardEnded(Exception):
    """Raised by the early-exit hook to end a forward whose remaining layers nobody reads."""


def routing_forward(model, recorder: RouterRecorder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    early_exit: bool = True) -> None:
    """`router_forward` inside `recorder`; with `early_exit` the forward ends right after the router of
    the recorder's deepest layer fired, so the decoder layers above it and the LM head never run.

    The end is a forward hook on that router raising an exception caught here (no model code is
    patched; transformers' output-capturing wrappers restore their state in `finally`). What the
    recorder holds is bit-identical to a full forward's. Not for sharded models (FSDP, ZeRO-3),
    whose gathers are undone by module hooks that a forward ended early skips.
    """
    with recorder:
        if not early_exit:
            router_forward(model, input_ids, attention_mask)
            return
        deepest = max(recorder.sites, key=lambda s: s.layer)

        def end_forward(_module, _inputs, _output):
            if not _in_backward():
                raise _ForwardEnded

        handle = deepest.module.register_forward_hook(end_forward)  # after the recorder's hook on it
        try:
            router_forward(model, input_ids, attention_mask)
        except _ForwardEnded:
            pass
        finally:
            handle.remove()


def router_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra):
    """A forward that feeds every router but computes the LM head for one position only and no aux loss.

    Positions count real tokens (`position_ids_from_mask`), so left-padded rows route exactly
    like unpadded ones. `extra` goes to the model (e.g. `output_hidden_states=True`).
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1, **extra)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config.get_text_config(), "output_router_logits"):
        kwargs["output_router_logits"] = False
    return model(**kwargs)


def span_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Which real tokens are pooled: all, the prompt (< prompt_length) or the response (>=)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = attention_mask.bool()
    if pooling == "all":
        return mask
    positions = position_ids_from_mask(attention_mask)
    in_prompt = positions < prompt_lengths.to(positions.device).unsqueeze(-1)
    return mask & (in_prompt if pooling == "prompt" else ~in_prompt)


@torch.no_grad()
def pooled_routing(model, recorder: RouterRecorder, sequences: list[list[int]], tokenizer,
                   prompt_lengths: list[int] | None = None, pooling: str = "all", side: str = "right") -> torch.Tensor:
    """Router distributions of a batch mean-pooled per sequence: `[B, num_layers, E]` fp32 on CPU.

    The token id lists are padded by `loading.pad_batch` (the tokenizer's pad token) on `side`.
    `pooling` picks the span (`span_mask`); `prompt` and `response` need `prompt_lengths`.
    """
    from sara_moe.runtime.loading import pad_batch

    device = next(model.parameters()).device
    ids, mask = pad_batch(tokenizer, sequences, side)
    ids, mask = ids.to(device), mask.to(device)
    lengths = torch.tensor(prompt_lengths if prompt_lengths is not None else [0] * len(sequences), device=device)
    with recorder:
        router_forward(model, ids, mask)
    probs = recorder.probabilities(mask)
    pool = span_mask(mask, lengths, pooling)
    return torch.stack([D.masked_mean(probs[layer], pool) for layer in recorder.layers], dim=1).cpu()


ROUTING_SOURCES = ("dense", "dispatched")


class PooledSequences(NamedTuple):
    """What `pool_sequences` returns: `pooled [B, layers, E]` and `counts [layers, E]` (CPU), the batch's
    real `tokens`, the model's `outputs` (None when the forward ended early) and the padded `attention_mask`."""

    pooled: torch.Tensor
    counts: torch.Tensor
    tokens: int
    outputs: object
    attention_mask: torch.Tensor


@torch.no_grad()
def pool_sequences(model, recorder: RouterRecorder, sequences: list[list[int]], tokenizer, routing: str = "dense",
                   early_exit: bool = False, **extra) -> PooledSequences:
    """One forward of a batch of token id lists: per sequence the mean over its real tokens of each recorded
    router's distribution, and per layer how many dispatched slots each expert got. The pooling and counting
    of `sara analyze` and of the training monitor (`train.monitor`), so the two agree by construction.

    `recorder` needs `keep_topk=True` (the dispatch; routers that do not return their selection get the
    top-k of their aligned distribution there). `routing`: `dense` pools the router probabilities
    (what SARA trains on), `dispatched` the selected experts' weights renormalised to 1 per token.
    Padding is `loading.pad_batch` on the tokenizer's side, on the device of the input embeddings.
    `early_exit` ends the forward after the deepest recorded router (`routing_forward`); `extra` goes to a
    full forward (`output_hidden_states=True` for analysis's hidden-state alignment).
    """
    from sara_moe.runtime.loading import pad_batch

    if routing not in ROUTING_SOURCES:
        raise ValueError(f"routing must be one of {ROUTING_SOURCES}, got {routing!r}")
    if not recorder.keep_topk:
        raise ValueError("pool_sequences needs RouterRecorder(..., keep_topk=True): it counts the dispatch")
    device = model.get_input_embeddings().weight.device  # first device under device_map="auto"
    ids, mask = pad_batch(tokenizer, sequences)
    ids, mask = ids.to(device), mask.to(device)
    outputs = None
    if early_exit and not extra:
        routing_forward(model, recorder, ids, mask, early_exit=True)
    else:
        with recorder:
            outputs = router_forward(model, ids, mask, **extra)
    real = mask.reshape(-1).bool()
    probs = recorder.probabilities(mask)
    pooled, counts = [], []
    for layer in recorder.layers:
        dense = probs[layer]  # [B, S, E], pads zeroed
        weights, indices = recorder.topk[layer]  # per token (pads included), [B*S, k] each
        indices = indices.long()
        if routing == "dispatched":  # selected weights renormalised to 1 per token
            weights = weights.float() / weights.float().sum(-1, keepdim=True).clamp_min(1e-20)
            dense = torch.zeros_like(dense.reshape(-1, dense.shape[-1])).scatter_add_(1, indices, weights)
            dense = dense.view(probs[layer].shape) * mask.to(dense.device)[..., None]
        pooled.append(D.masked_mean(dense, mask.to(dense.device)).cpu())
        picked = indices[real.to(indices.device)].reshape(-1)
        counts.append(torch.bincount(picked, minlength=dense.shape[-1]).cpu())
    recorder.clear()
    return PooledSequences(torch.stack(pooled, 1), torch.stack(counts), int(real.sum()), outputs, mask)
