"""Router steering: forcing/banning experts in every family, bit-identity at strength 0,
PEFT/bf16/generate, per-row steering, restore on errors, identification of planted experts,
and one-line errors for specs that do not fit the model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sara_moe.architectures import find_routers
from sara_moe.architectures.fingerprint import config_hash
from sara_moe.architectures.tiny import TINY_ARCHS
from sara_moe.routing import RouterRecorder, position_ids_from_mask
from sara_moe.steering import steer

TEXTS = ["The cat sleeps on the warm mat.", "Water boils."]
BIG = 50.0


@pytest.fixture(scope="module")
def load(tiny_model_dir):
    def get(arch: str, dtype=torch.float32):
        path = tiny_model_dir(arch)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return model, AutoTokenizer.from_pretrained(path)

    return get


def batch(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return dict(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False)


@torch.no_grad()
def run(model, inputs):
    """(output logits, {layer: router logits}, {layer: top-k indices}) of one forward."""
    with RouterRecorder(model, keep_topk=True) as rec:
        logits = model(**inputs).logits
    return logits, dict(rec.scores), {layer: idx for layer, (_, idx) in rec.topk.items()}


def hit_rate(indices, expert, mask):
    """Fraction of real tokens whose top-k includes `expert`."""
    return (indices == expert).any(-1)[mask.reshape(-1).bool()].float().mean().item()


def hook_counts(model):  # torch keeps hooks in these private dicts and has no public count of them
    return [(len(s.module._forward_hooks), len(s.module._forward_pre_hooks)) for s in find_routers(model)]


def check_force_ban_zero(model, tokenizer):
    inputs = batch(tokenizer)
    mask = inputs["attention_mask"]
    sites = find_routers(model)
    last = sites[-1]
    base_logits, base_scores, base_idx = run(model, inputs)
    # the least-used expert of the last MoE layer, so forcing it is a real change
    expert = min(range(8), key=lambda e: hit_rate(base_idx[last.layer], e, mask))
    assert hit_rate(base_idx[last.layer], expert, mask) < 1.0
    spec = steer.build_spec(model, {last.layer: [expert]})
    hooks_before = hook_counts(model)

    with steer.steering(model, spec, 0.0):
        zero_logits, zero_scores, zero_idx = run(model, inputs)
    assert torch.equal(zero_logits, base_logits)
    assert all(torch.equal(zero_scores[s.layer], base_scores[s.layer]) for s in sites)
    assert all(torch.equal(zero_idx[s.layer], base_idx[s.layer]) for s in sites)

    with steer.steering(model, spec, BIG):
        forced_logits, forced_scores, forced_idx = run(model, inputs)
    assert hit_rate(forced_idx[last.layer], expert, mask) == 1.0
    assert not torch.equal(forced_logits, base_logits)
    for site in sites[:-1]:  # layers before the steered one see exactly the unsteered model
        assert torch.equal(forced_scores[site.layer], base_scores[site.layer])
        assert torch.equal(forced_idx[site.layer], base_idx[site.layer])
    delta = (forced_scores[last.layer] - base_scores[last.layer]).float()
    others = [e for e in range(8) if e != expert]
    if last.scoring == "sigmoid":  # the bias goes to the selection scores, not the logits
        assert torch.equal(delta, torch.zeros_like(delta))
    else:
        assert torch.equal(delta[:, others], torch.zeros_like(delta[:, others]))
        assert torch.allclose(delta[:, expert], torch.full_like(delta[:, expert], BIG), atol=0.5)

    with steer.steering(model, spec, -BIG):
        _, _, banned_idx = run(model, inputs)
    assert hit_rate(banned_idx[last.layer], expert, mask) == 0.0
    assert hook_counts(model) == hooks_before
    return expert, last.layer


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_force_ban_and_zero_strength_every_architecture(load, arch):
    model, tokenizer = load(arch)
    biases = {s.layer: s.module.e_score_correction_bias.clone() for s in find_routers(model)
              if hasattr(s.module, "e_score_correction_bias")}
    check_force_ban_zero(model, tokenizer)
    for site in find_routers(model):
        if site.layer in biases:
            assert torch.equal(site.module.e_score_correction_bias, biases[site.layer])


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_bf16(load, arch):
    model, tokenizer = load(arch, torch.bfloat16)
    check_force_ban_zero(model, tokenizer)


@pytest.mark.parametrize("arch,target", [("qwen3_moe", "mlp.gate.weight"), ("gpt_oss", "mlp.router.weight"),
                                         ("glm4_moe", "mlp.gate.weight")])
def test_peft_router_lora(load, arch, target):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(arch)
    fingerprint = config_hash(model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_parameters=[target], init_lora_weights=False)).eval()
    assert config_hash(peft_model) == fingerprint  # a base-model spec loads on the PEFT model
    assert find_routers(peft_model)[-1].name.endswith("base_layer")
    check_force_ban_zero(peft_model, tokenizer)


def test_generate_is_steered_and_zero_strength_is_identical(load):
    model, tokenizer = load("qwen3_moe")
    enc = tokenizer(["The cat"], return_tensors="pt")
    site = find_routers(model)[-1]
    seen = []
    handle = site.module.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    try:
        base = model.generate(**enc, **kwargs)
        spec = steer.build_spec(model, {site.layer: [3]})
        with steer.steering(model, spec, 0.0):
            zero = model.generate(**enc, **kwargs)
        seen.clear()
        with steer.steering(model, spec, BIG):
            model.generate(**enc, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(zero, base)
    assert len(seen) == 5  # prefill + 4 cached steps, every one steered
    assert all(bool((idx == 3).any(-1).all()) for idx in seen)


def test_row_languages_steer_only_their_rows(load):
    model, tokenizer = load("mixtral")
    inputs = batch(tokenizer, ["The cat sleeps.", "The cat sleeps."])
    layer = find_routers(model)[-1].layer
    base_logits, _, base_idx = run(model, inputs)
    expert = min(range(8), key=lambda e: hit_rate(base_idx[layer], e, inputs["attention_mask"]))
    spec = steer.build_spec(model, {layer: [expert]})
    with steer.steering(model, spec, BIG, langs=["sw"]) as steering:
        with pytest.raises(RuntimeError, match="set_language"):
            run(model, inputs)
        steering.set_row_languages(["sw", "en"])
        logits, _, idx = run(model, inputs)
        steering.set_language("en")
        en_logits, _, _ = run(model, inputs)
    per_row = (idx[layer] == expert).any(-1).view(2, -1)
    assert bool(per_row[0].all()) and not bool(per_row[1].all())
    assert torch.equal(idx[layer].view(2, -1, 2)[1], base_idx[layer].view(2, -1, 2)[1])
    # row 1 is unsteered; only float noise from the experts' batched matmuls over other rows differs
    assert torch.allclose(logits[1], base_logits[1], atol=1e-6) and (logits[0] - base_logits[0]).abs().max() > 1e-3
    assert torch.equal(en_logits, base_logits)


def test_error_inside_router_forward_restores_everything(load):
    model, tokenizer = load("deepseek_v3")
    inputs = batch(tokenizer)
    base_logits, _, _ = run(model, inputs)
    site = find_routers(model)[-1]
    original = site.module.e_score_correction_bias
    spec = steer.build_spec(model, {site.layer: [1]})

    def boom(*_):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        with steer.steering(model, spec, BIG):
            handle = site.module.register_forward_pre_hook(boom)  # runs after steering's own pre-hook
            try:
                run(model, inputs)
            finally:
                handle.remove()
    assert site.module.e_score_correction_bias is original
    assert torch._C._len_torch_function_stack() == 0  # no TorchFunctionMode left (torch has no public view)
    assert hook_counts(model) == [(0, 0)] * len(find_routers(model))
    assert torch.equal(run(model, inputs)[0], base_logits)
    # the same for a logits-path router (TorchFunctionMode)
    model, tokenizer = load("olmoe")
    site = find_routers(model)[-1]
    with pytest.raises(KeyError):
        with steer.steering(model, steer.build_spec(model, {site.layer: [1]}), BIG):
            handle = site.module.register_forward_pre_hook(boom)
            try:
                run(model, batch(tokenizer))
            finally:
                handle.remove()
    assert torch._C._len_torch_function_stack() == 0


PLANTED = {1: [1], 2: [4]}  # task experts: chosen for task-only tokens
COMMON = {1: [6], 2: [0]}  # chosen for every token, task or not: frequent but not task-specific
TASK = ["7+5=12", "30-4=26", "9*8=72", "64/8=8", "13+29=42", "100-1=99", "6*7=42", "81/9=9"]


def plant_task_experts(model, tokenizer, general_texts):
    """Hidden dim 0 is +1 for task-only tokens and -1 for all others, dim 1 is +1 everywhere;
    in the PLANTED layers the routers read dim 0 only through the task expert (logit ~ +-20)
    and dim 1 only through the common expert (logit ~ 12), so the top-2 of a task token is
    {task, common} and that of any other token is {common, something else}."""
    ids = lambda texts: {t for text in texts for t in tokenizer(text)["input_ids"]}  # noqa: E731
    task_only = sorted(ids(TASK) - ids(general_texts) - set(tokenizer.all_special_ids))
    task_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TASK)
    assert len(task_only) >= 8
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0], embed[:, 1] = -1.0, 1.0
        embed[task_only, 0] = 1.0
        for site in find_routers(model):
            if site.layer in PLANTED:
                site.module.weight[:, :2] = 0.0
                site.module.weight[PLANTED[site.layer], 0] = 5.0
                site.module.weight[COMMON[site.layer], 1] = 3.0
    return len(TASK) / task_tokens  # fraction of task tokens that are <s>


def test_identify_finds_planted_experts_cli_and_api(load, tmp_path, example_texts):
    from sara_moe.cli import main

    model, tokenizer = load("qwen3_moe")
    general = [t for t in example_texts if t.isascii()][:12]
    bos_share = plant_task_experts(model, tokenizer, general)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    task_file, general_file = tmp_path / "task.jsonl", tmp_path / "general.jsonl"
    task_file.write_text("".join(json.dumps({"id": f"t{i}", "en": t, "sw": "x"}) + "\n" for i, t in enumerate(TASK)))
    general_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in general))

    out = tmp_path / "spec.json"
    assert main(["steer", "identify", "--model", str(tmp_path / "model"), "--task-data", str(task_file),
                 "--general-data", str(general_file), "--top-k", "1", "--output", str(out), "--batch-size", "3"]) == 0
    spec = steer.load_spec(out, model, tokenizer)
    assert {e["layer"]: e["experts"] for e in spec["layers"]} == PLANTED
    for entry in spec["layers"]:
        [task], [common] = PLANTED[entry["layer"]], COMMON[entry["layer"]]
        assert entry["task_frequency"][task] == pytest.approx(1 - bos_share, abs=1e-5)
        assert entry["general_frequency"][task] == 0.0
        assert entry["scores"] == [pytest.approx(1 - bos_share, abs=1e-5)]
        # the common expert is the most frequent on task data, but general text uses it as much
        assert entry["task_frequency"][common] == entry["general_frequency"][common] == 1.0
    assert spec["config"]["resolved_layers"] == [1, 2] and spec["data"]["general"]["tokens"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".spec")] == []  # no temp file left

    # API, uniform k/E baseline (cannot tell task from common experts), question-format data
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps({"question": t}) + "\n" for t in TASK))
    spec = steer.identify(model, tokenizer, question_file, layers="1,2", top_k=2, progress=False)
    assert {e["layer"]: sorted(e["experts"]) for e in spec["layers"]} == {
        layer: sorted(PLANTED[layer] + COMMON[layer]) for layer in PLANTED}
    assert spec["data"]["general"] is None and spec["layers"][0]["general_frequency"] == [0.25] * 8


def one_line_error(fn, match):
    with pytest.raises(steer.SteeringSpecError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_specs_are_one_line_errors(load, tmp_path):
    qwen, qwen_tok = load("qwen3_moe")
    deepseek, _ = load("deepseek_v2")
    spec = steer.build_spec(qwen, {1: [2]})
    path = steer.save_spec(spec, tmp_path / "spec.json")
    assert steer.load_spec(path, qwen, qwen_tok)["layers"] == [{"layer": 1, "experts": [2]}]
    one_line_error(lambda: steer.load_spec(path, deepseek), "fingerprint does not match")
    one_line_error(lambda: steer.build_spec(deepseek, {0: [1]}),
                   r"layer 0 is not an MoE layer; MoE layers are \[1, 2, 3\]")
    one_line_error(lambda: steer.build_spec(qwen, {1: [8]}), r"expert ids \[8\] out of range 0..7")
    one_line_error(lambda: steer.load_spec(tmp_path / "missing.json", qwen), "no such steering spec")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(lambda: steer.load_spec(tmp_path / "bad.json", qwen), "not valid JSON")
    with pytest.raises(steer.SteeringSpecError):  # steering() validates too
        with steer.steering(deepseek, spec, 1.0):
            pass
    wide, _ = load("qwen3_moe", torch.bfloat16)  # same architecture in another dtype: fingerprint matches
    assert steer.load_spec(path, wide)["model"]["fingerprint"] == spec["model"]["fingerprint"]


def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    from sara_moe.cli import main

    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"id": "a", "sw": "Paka"}) + "\n")
    model = str(tiny_model_dir("deepseek_v2"))
    args = ["steer", "identify", "--model", model, "--output", str(tmp_path / "s.json")]
    assert main(args + ["--task-data", str(data)]) == 1
    assert "task.jsonl:1: no 'text' or 'question' field and no 'en' field" in capsys.readouterr().err
    data.write_text(json.dumps({"text": "The cat"}) + "\n")
    assert main(args + ["--task-data", str(data), "--layers", "0"]) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "sara steer: error:" in line]
    assert line.endswith("--layers: layer(s) [0] are dense (no router) and cannot be aligned or steered; "
                         "MoE layers are 1-3 of 4 decoder layers")
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("arch", ["deepseek_v3", "olmoe"])
def test_nested_steerings_stack_and_unwind(load, arch):
    model, tokenizer = load(arch)
    inputs = batch(tokenizer)
    site = find_routers(model)[-1]
    _, _, base_idx = run(model, inputs)
    spec = steer.build_spec(model, {site.layer: [2]})
    original = getattr(site.module, "e_score_correction_bias", None)
    with steer.steering(model, spec, BIG):
        _, _, forced_idx = run(model, inputs)
        with steer.steering(model, spec, -BIG):
            _, _, cancelled_idx = run(model, inputs)
    assert hit_rate(forced_idx[site.layer], 2, inputs["attention_mask"]) == 1.0
    assert torch.equal(cancelled_idx[site.layer], base_idx[site.layer])
    assert getattr(site.module, "e_score_correction_bias", None) is original
    assert torch._C._len_torch_function_stack() == 0
