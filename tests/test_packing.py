"""Packed and padding-free SARA: a packed batch's loss and router gradients equal those of the same examples
run one by one without padding (fp32, 1e-5 relative), cached and online, per family; the early-exit
online anchor equals the full-forward one exactly; refused packing strategies say why in one line.

The reference never touches the recorder or the collator: each example alone, its routing read from
`output_router_logits`, its CE summed over its own labels.
"""

from __future__ import annotations

import json

import pytest
import torch

from sara_moe import priors as P
from sara_moe.architectures import find_routers, router_weight
from sara_moe.data.train_data import build_train_dataset
from sara_moe.routing import RouterRecorder
from sara_moe.train import build_trainer
from test_train import config, first_batch, js_inline

LAMBDA = 1.5
MODES = {"padded": {}, "padding_free": {"padding_free": True}, "bfd": {"packing": True},
         "bfd_split": {"packing": True, "packing_strategy": "bfd_split"}}


@pytest.fixture(scope="module")
def instruct_corpus(tmp_path_factory):
    """Prompt/response groups: labels only on the response, so the label mask and `pooling` matter."""
    path = tmp_path_factory.mktemp("instruct") / "instruct.jsonl"
    words = {"en": "the cat river market doctor water school rice", "sw": "paka mto soko daktari maji shule wali",
             "es": "el gato río mercado médico agua escuela arroz"}
    with open(path, "w") as fh:
        for g in range(12):
            row = {"id": f"q{g}"}
            for lang, vocab in words.items():
                w = vocab.split()
                row[lang] = {"prompt": " ".join(w[(g + k) % len(w)] for k in range(2 + g % 3)),
                             "response": " ".join(w[(3 * g + k) % len(w)] for k in range(3 + g % 4))}
            fh.write(json.dumps(row) + "\n")
    return path


def distribution(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    if sigmoid:
        s = torch.sigmoid(logits.float())
        return s / s.sum(-1, keepdim=True)
    return logits.float().softmax(-1)


def moe_layers(model) -> list[int]:
    return [s.layer for s in find_routers(model)]


def reference(model, rows: list[dict], anchors: list[torch.Tensor | None], align: list[int], sigmoid: bool,
              pooling: str = "all") -> torch.Tensor:
    """CE over all label tokens of `rows` (each run alone, unpadded) + LAMBDA * mean JS to `anchors`."""
    layers, nll, count, js = moe_layers(model), 0.0, 0, []
    for row, anchor in zip(rows, anchors):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        target, logits = labels[0, 1:], out.logits[0, :-1].float()
        keep = target != -100
        nll = nll + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
        if anchor is None:
            continue
        span = {"all": torch.ones_like(labels[0], dtype=torch.bool), "response": labels[0] != -100,
                "prompt": labels[0] == -100}[pooling]
        per_layer = [js_inline(distribution(out.router_logits[layers.index(layer)], sigmoid)[span].mean(0),
                               anchor[k]) for k, layer in enumerate(align)]
        js.append(torch.stack(per_layer).mean())
    return nll / count + LAMBDA * torch.stack(js).mean()


@torch.no_grad()
def anchor_routing(model, ids: list[int], align: list[int], sigmoid: bool) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
    return torch.stack([distribution(out.router_logits[moe_layers(model).index(layer)], sigmoid).mean(0)
                        for layer in align])


def router_grads(model) -> dict[str, torch.Tensor]:
    return {site.name: router_weight(site).grad.clone() for site in find_routers(model)}


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5):
    scale = float(want.abs().max())
    assert scale > 0
    assert float((got - want).abs().max()) <= rel * scale, (float((got - want).abs().max()), scale)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("anchor_mode", ["cached", "online"])
@pytest.mark.parametrize("mode", list(MODES))
def test_packed_loss_and_router_grads_equal_unpadded_examples(arch, anchor_mode, mode, tiny_model_dir,
                                                              example_corpus, tmp_path):
    model_dir = tiny_model_dir(arch)
    priors = P.extract_priors(str(model_dir), example_corpus, tmp_path / "p.safetensors", progress=False) \
        if anchor_mode == "cached" else None
    trainer, _ = build_trainer(config(tmp_path, model_dir, example_corpus, priors, lambda_js=LAMBDA, train_anchor=True,
                                      anchor_mode=anchor_mode, router_aux_loss_coef=0.0, max_length=48,
                                      per_device_train_batch_size=3, **MODES[mode]))
    # a batch holding an anchor-language example, which is left out of the alignment mean
    batch = next(b for b in trainer.get_train_dataloader() if any(n.endswith(":en") for n in b["sara_name"]))
    batch = trainer._prepare_inputs(batch)
    names = list(batch["sara_name"])
    if mode != "padded":  # one row holds several whole examples, pads none
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and len(names) >= 3
        assert int((batch["sara_segment"] >= 0).sum()) == batch["input_ids"].shape[1]
    model = trainer.model.train()
    sigmoid, align = arch == "deepseek_v3", trainer.align_layers
    data, _ = build_train_dataset(example_corpus, trainer.processing_class, train_anchor=True, max_length=48,
                                  anchor_mode=anchor_mode,
                                  prior_rows=P.load_priors(priors).row_of() if priors else None)
    by_name = {row["sara_name"]: row for row in data}
    rows = [by_name[n] for n in names]
    if anchor_mode == "cached":
        table = P.load_priors(priors)
        cols = [table.layers.index(layer) for layer in align]
        anchors = [table.table[r["sara_prior_row"]][cols] if r["sara_has_anchor"] else None for r in rows]
    else:
        anchors = [anchor_routing(model.eval(), r["sara_anchor_ids"], align, sigmoid) if r["sara_has_anchor"]
                   else None for r in rows]
        model.train()
    assert any(a is None for a in anchors) and any(a is not None for a in anchors)

    model.zero_grad()
    want = reference(model, rows, anchors, align, sigmoid)
    want.backward()
    want_grads = router_grads(model)
    model.zero_grad()
    got = trainer.compute_loss(model, dict(batch))
    got.backward()
    got_grads = router_grads(model)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for name, grad in want_grads.items():
        assert_close_rel(got_grads[name], grad)
    assert any(float(g.abs().max()) > 0 for g in want_grads.values())


@pytest.mark.parametrize("pooling", ["response", "prompt"])
def test_packed_label_mask_and_pooling_span_follow_each_example(pooling, tiny_model_dir, instruct_corpus, tmp_path):
    """Prompt/response data: CE counts only response labels and pooling reads each example's own span,
    although TRL's padding-free collator relabels every segment's first token."""
    trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("glm4_moe"), instruct_corpus, lambda_js=LAMBDA,
                                      anchor_mode="online", pooling=pooling, router_aux_loss_coef=0.0,
                                      max_length=128, per_device_train_batch_size=2, packing=True))
    batch = first_batch(trainer)
    model, align = trainer.model.train(), trainer.align_layers
    data, _ = build_train_dataset(instruct_corpus, trainer.processing_class, max_length=128, anchor_mode="online")
    by_name = {row["sara_name"]: row for row in data}
    rows = [by_name[n] for n in batch["sara_name"]]
    assert len(rows) > 3 and all(r["labels"][0] == -100 for r in rows)
    anchors = []
    for r in rows:
        with torch.no_grad():
            out = model.eval()(input_ids=torch.tensor([r["sara_anchor_ids"]]), output_router_logits=True,
                               use_cache=False)
        keep = torch.arange(len(r["sara_anchor_ids"])) < r["sara_anchor_prompt_len"]  # as priors pool it
        keep = keep if pooling == "prompt" else ~keep
        anchors.append(torch.stack([distribution(out.router_logits[moe_layers(model).index(layer)], True)[keep]
                                    .mean(0) for layer in align]))
    model.train().zero_grad()
    want = reference(model, rows, anchors, align, sigmoid=True, pooling=pooling)  # glm4_moe: sigmoid scores
    want.backward()
    want_grads = router_grads(model)
    model.zero_grad()
    got = trainer.compute_loss(model, dict(batch))
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for name, grad in want_grads.items():
        assert_close_rel(router_grads(model)[name], grad)


def test_early_exit_anchor_equals_full_forward_anchor(tiny_model_dir, example_corpus, tmp_path):
    trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("deepseek_v3"), example_corpus, anchor_mode="online",
                                      align_layers="1-2", packing=True, max_length=48))
    batch = first_batch(trainer)
    model = trainer.model.train()
    rows = batch["sara_has_anchor"].nonzero().squeeze(-1)
    trainer._recorder = RouterRecorder(model, trainer.align_layers)  # its scoring probe runs a full forward
    ran = []
    top = model.model.layers[3].register_forward_hook(lambda *_: ran.append("layer 3"))
    head = model.lm_head.register_forward_hook(lambda *_: ran.append("lm_head"))
    early = trainer._online_anchor(model, batch, rows)
    assert ran == [] and model.training  # nothing above the band ran; training mode restored
    trainer.is_deepspeed_enabled = True  # sharded weights: the full forward
    full = trainer._online_anchor(model, batch, rows)
    top.remove()
    head.remove()
    assert ran == ["layer 3", "lm_head"]
    assert torch.equal(early, full) and early.shape == (len(rows), 2, model.config.n_routed_experts)


def test_refused_packing_says_why_in_one_line(tiny_model_dir, example_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"^field packing_strategy: 'wrapped' cuts examples mid-sequence") as err:
        build_trainer(config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus, anchor_mode="online",
                             packing=True, packing_strategy="wrapped", max_length=48))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"bfd_split would split example s\d\d:\w+ \(\d+ tokens > max_length 6\)"):
        trainer, _ = build_trainer(config(tmp_path, tiny_model_dir("qwen3_moe"), example_corpus,
                                          anchor_mode="online", max_length=48))
        cfg = trainer.args
        cfg.packing, cfg.packing_strategy, cfg.max_length = True, "bfd_split", 6
        trainer._prepare_dataset(trainer.train_dataset, trainer.processing_class, cfg, True, None, "train")


@pytest.mark.parametrize("anchor_mode", ["cached", "online"])
@pytest.mark.parametrize("layout", ["packing: true\nmax_length: 64\n", "padding_free: true\nmax_length: 64\n"])
def test_sara_train_runs_packed_and_padding_free(anchor_mode, layout, tiny_model_dir, example_corpus, tmp_path):
    from sara_moe.cli import main

    model_dir = tiny_model_dir("qwen3_moe")
    priors = P.extract_priors(str(model_dir), example_corpus, tmp_path / "p.safetensors", max_length=64,
                              progress=False)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"model_name_or_path: {model_dir}\ndata: {example_corpus}\npriors: {priors}\n"
                        f"anchor_mode: {anchor_mode}\nmax_steps: 2\nreport_to: none\nalign_layers: 1-2\n"
                        f"per_device_train_batch_size: 2\n{layout}")
    out = tmp_path / "out"
    assert main(["train", "--config", str(run_yaml), "--output_dir", str(out)]) == 0
    resolved = json.loads((out / "sara_config.json").read_text())
    assert resolved["max_length"] == 64  # padding-free's hand-over to TRL leaves the user's value in place
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "js_loss" in h]
    assert [h["step"] for h in logged] == [1, 2] and all(h["js_loss"] > 0 for h in logged)
