"""The paper's recipes (configs/paper/) and its lm-eval task list (lm_eval_tasks/sara_paper.yaml).

- Each recipe runs as a user types it, with only --model_name_or_path, --data, --output_dir and
  --priors changed, on a tiny random model of its architecture: 2 optimizer steps, exactly the
  recipe's values in the written config, its layer band resolved on the tiny depth and on the
  real models' depth (7-34 of Qwen3-30B-A3B's 48 layers, as the paper states).
- The 15 tasks of the list run offline through `sara eval --backend lm-eval --tasks LIST.yaml`
  on tiny local datasets in each task's own format (the hub datasets' columns and splits), and
  every score matches an independent computation with sara's own scorer or model.generate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from sara_moe.architectures import parse_layer_spec
from sara_moe.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"qwen3_30b_a3b": "qwen3_moe", "phi35_moe_instruct": "phimoe"}
LANGS = ["en", "hi", "ne", "bn", "te", "sw"]
WORDS = {"en": "the cat", "hi": "बिल्ली", "ne": "बिरालो", "bn": "বিড়াল", "te": "పిల్లి", "sw": "paka"}

# The checkpoints' published config.json values that fix depth and size (transformers' config classes).
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                     tie_word_embeddings=False)
PHI35_MOE = dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
                 tie_word_embeddings=False)


def _recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "paper" / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def paper_corpus(tmp_path_factory) -> Path:
    """3 groups x (en + the five languages) of prompt/response pairs: 15 training examples."""
    path = tmp_path_factory.mktemp("paper_corpus") / "corpus.jsonl"
    rows = [{"id": f"g{g}", **{lang: {"prompt": f"{WORDS[lang]} {g} question {g + 1}?",
                                      "response": f"{WORDS[lang]} answer {g * 7}."} for lang in LANGS}}
            for g in range(3)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_two_steps_on_a_tiny_model(recipe, paper_corpus, tmp_path, monkeypatch):
    """`sara train --config configs/paper/X.yaml` with only model, data, output and priors changed."""
    from sara_moe.architectures.tiny import save_tiny

    monkeypatch.chdir(tmp_path)
    texts = [line for line in paper_corpus.read_text(encoding="utf-8").splitlines()]
    model = save_tiny(RECIPES[recipe], tmp_path / "tiny", texts, vocab_size=400)
    priors = tmp_path / "priors.safetensors"
    assert main(["priors", "--model", str(model), "--data", str(paper_corpus), "--output", str(priors),
                 "--max_length", "2048", "--device", "cpu"]) == 0
    out = tmp_path / "sara"
    assert main(["train", "--config", str(REPO / "configs" / "paper" / f"{recipe}.yaml"),
                 "--model_name_or_path", str(model), "--data", str(paper_corpus), "--output_dir", str(out),
                 "--priors", str(priors)]) == 0

    # 15 examples, 2 per device x 16 accumulation = 1 step per epoch, 2 epochs (the recipe's own)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [h for h in state["log_history"] if "js_loss" in h]
    assert [h["step"] for h in steps] == [1, 2] and all(h["js_loss"] > 0 for h in steps)
    run = json.loads((out / "sara_run.json").read_text())
    assert run["align_layers_resolved"] == [1, 2]  # `middle` on 4 layers: 7/48 <= i/4 < 35/48
    assert (run["data_stats"]["examples"], run["data_stats"]["langs"]) == (15, ["hi", "ne", "bn", "te", "sw"])
    written = json.loads((out / "sara_config.json").read_text())
    changed = {"model_name_or_path", "data", "output_dir", "priors"}
    for key, value in _recipe(recipe).items():
        if key in changed:
            continue
        got = written[key]
        if key == "align_layers":
            assert got == [value]
        elif key == "report_to":  # transformers stores "none" as no integrations
            assert value == "none" and got == []
        else:
            assert got == value, key
    tiny_coef = transformers.AutoConfig.from_pretrained(model).router_aux_loss_coef
    assert written["router_aux_loss_coef"] == tiny_coef  # the model's own load-balancing weight (paper)


def test_recipe_bands_on_the_real_depths():
    """`middle` is the paper's 7-34 on Qwen3-30B-A3B (48 MoE layers) and 5-23 on Phi-3.5-MoE (32)."""
    qwen, phi = _recipe("qwen3_30b_a3b"), _recipe("phi35_moe_instruct")
    with torch.device("meta"):
        qwen_model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_30B_A3B))
        phi_model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**PHI35_MOE))
    from sara_moe.architectures import resolve_layer_spec

    assert resolve_layer_spec(qwen_model, qwen["align_layers"], field_name="align_layers") == list(range(7, 35))
    assert parse_layer_spec("7-34", list(range(48)), 48) == list(range(7, 35))
    assert resolve_layer_spec(phi_model, phi["align_layers"], field_name="align_layers") == list(range(5, 24))
    # the paper's values, as the recipe states them
    for recipe in (qwen, phi):
        assert (recipe["lambda_js"], recipe["learning_rate"], recipe["num_train_epochs"], recipe["warmup_steps"],
                recipe["lr_scheduler_type"], recipe["divergence"], recipe["pooling"], recipe["anchor"]) == \
            (1.5, 2e-5, 2, 0.1, "cosine", "js", "all", "en")
        assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * 8 == 256
        assert recipe["train_langs"] == "hi,ne,bn,te,sw" and recipe["use_peft"] is False
    # sizes docs/paper.md computes memory from: 30.5B (3.3B active) and 41.9B (6.6B active) parameters
    qwen_total = sum(p.numel() for p in qwen_model.parameters())
    phi_total = sum(p.numel() for p in phi_model.parameters())
    assert round(qwen_total / 1e9, 1) == 30.5 and round(phi_total / 1e9, 1) == 41.9


# ----------------------------------------------------------------------------- the lm-eval task list

MMLU_LANGS = ["hi", "ne", "bn", "te", "sw"]
BELEBELE = {"hi": "hin_Deva", "ne": "npi_Deva", "bn": "ben_Beng", "te": "tel_Telu", "sw": "swh_Latn"}
MGSM_QUESTION = {"hi": "प्रश्न: ", "ne": "प्रश्न: ", "bn": "প্রশ্ন: ", "te": "ప్రశ్న: ", "sw": "Swali: "}
MGSM_STOPS = {lang: [word.strip(), "</s>", "<|im_end|>"] for lang, word in MGSM_QUESTION.items()}
SHIPPED_MEMBERS = [f"global_mmlu_full_{x}" for x in MMLU_LANGS] + [f"belebele_{BELEBELE[x]}" for x in MMLU_LANGS] + \
    [f"mgsm_direct_{x}" for x in MMLU_LANGS]


def _subjects() -> list[str]:
    """The 57 subjects Global-MMLU's subtasks filter on (lm-eval's own list)."""
    from lm_eval.tasks.global_mmlu.full.hi.utils import SUBJECTS

    return list(SUBJECTS)


def test_shipped_task_list_names_the_papers_tasks():
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'sara-moe[eval]')")
    from lm_eval.tasks import TaskManager

    from sara_moe.evaluation.lm_eval_bridge import TASKS_DIR, task_list_members

    assert task_list_members("sara_paper") == SHIPPED_MEMBERS
    index = TaskManager(include_path=str(TASKS_DIR)).task_index
    assert all(name in index for name in SHIPPED_MEMBERS + ["sara_paper"])
    assert index["mgsm_direct_hi"].yaml_path.parent == TASKS_DIR  # ours; lm-eval has no Hindi/Nepali MGSM
    assert index["mgsm_direct_bn"].yaml_path.parent != TASKS_DIR  # lm-eval's own


def _local_datasets(folder: Path) -> dict:
    """Tiny files with the hub datasets' columns and splits; {member: overrides pointing at them}."""
    from datasets import Dataset

    subjects = _subjects()
    overrides, truth = {}, {}
    for k, lang in enumerate(MMLU_LANGS):
        rows = [{"sample_id": f"{s}/test/{i}", "subject": s, "subject_category": "STEM",
                 "question": f"{WORDS[lang]} q{i} {s.replace('_', ' ')}?", "option_a": f"{i}", "option_b": f"{i + 1}",
                 "option_c": "x", "option_d": WORDS[lang], "answer": "ABCD"[(i + k) % 4]}
                for i, s in enumerate(subjects)]
        for split in ("test", "dev"):
            Dataset.from_list(rows).to_parquet(folder / f"gmmlu_{lang}_{split}.parquet")
        overrides[f"global_mmlu_full_{lang}"] = {"dataset_path": "parquet", "dataset_name": None, "dataset_kwargs": {
            "data_files": {s: str(folder / f"gmmlu_{lang}_{s}.parquet") for s in ("test", "dev")}}}
        truth[f"global_mmlu_full_{lang}"] = rows
        bele = [{"link": f"https://x/{i}", "question_number": 1, "flores_passage": f"{WORDS[lang]} passage {i}.",
                 "question": f"{WORDS[lang]} {i}?", "mc_answer1": "one", "mc_answer2": WORDS[lang],
                 "mc_answer3": f"{i}", "mc_answer4": "four", "correct_answer_num": str(1 + (i + k) % 4),
                 "dialect": BELEBELE[lang], "ds": "2023-05-03"} for i in range(6)]
        path = folder / f"belebele_{lang}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bele), encoding="utf-8")
        overrides[f"belebele_{BELEBELE[lang]}"] = {"dataset_path": "json", "dataset_name": None,
                                                   "dataset_kwargs": {"data_files": {"test": str(path)}}}
        truth[f"belebele_{BELEBELE[lang]}"] = bele
        mgsm = [{"question": f"{WORDS[lang]} has {i} and {i + 2}. How many?", "answer": None,
                 "answer_number": 2 * i + 2, "equation_solution": None} for i in range(4)]
        truth[f"mgsm_direct_{lang}"] = mgsm
        if lang in ("bn", "te", "sw"):  # lm-eval's tasks over the hub copy's columns (train = the exemplars)
            for split in ("test", "train"):
                path = folder / f"mgsm_{lang}_{split}.jsonl"
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mgsm), encoding="utf-8")
            overrides[f"mgsm_direct_{lang}"] = {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {
                "data_files": {s: str(folder / f"mgsm_{lang}_{s}.jsonl") for s in ("test", "train")}}}
        else:  # ours: MGSM's release TSV (question<TAB>answer)
            path = folder / f"mgsm_{lang}.tsv"
            path.write_text("".join(f"{r['question']}\t{r['answer_number']}\n" for r in mgsm), encoding="utf-8")
            overrides[f"mgsm_direct_{lang}"] = path
    return overrides, truth


def _flexible_extract(text: str) -> str:
    """lm-eval's MGSM flexible-extract filter (last regex match) and exact_match's normalisation."""
    matches = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not matches:
        return "[invalid]"
    match = [m for m in matches[-1] if m][0]
    return match.strip().lower().strip(".,!?;:'\"$")


def test_task_list_runs_offline_and_matches_an_independent_computation(tiny_model_dir, tmp_path, monkeypatch):
    """`sara eval --backend lm-eval --tasks LIST.yaml`: the shipped list's members, pointed at local files."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'sara-moe[eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sara_moe.evaluation.evaluate import load_model, score_mc
    from sara_moe.evaluation.items import EvalItem
    from sara_moe.evaluation.lm_eval_bridge import task_list_members

    overrides, truth = _local_datasets(tmp_path)
    members = []
    for name in task_list_members("sara_paper"):
        key = "group" if name.startswith("global_mmlu") else "task"
        extra = overrides[name]
        if name.startswith("mgsm"):  # lm-eval generates up to 256 tokens, the tiny model's whole context
            lang = name.rsplit("_", 1)[1]
            short = {"generation_kwargs": {"do_sample": False, "until": MGSM_STOPS[lang], "max_gen_toks": 6}}
        if name == "mgsm_direct_ne":  # the other way a user points our MGSM at a file: the environment
            monkeypatch.setenv("SARA_MGSM_NE", str(extra))
            members.append({"task": name, **short})
        elif name == "mgsm_direct_hi":
            members.append({"task": name, "dataset_kwargs": {"data_files": str(extra)}, **short})
        else:
            members.append({key: name, **extra, **(short if name.startswith("mgsm") else {})})
    task_list = tmp_path / "paper_offline.yaml"
    task_list.write_text(yaml.safe_dump({"group": "paper_offline", "task": members}, allow_unicode=True))

    model_dir = tiny_model_dir("qwen3_moe")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--output_dir", str(out), "--backend", "lm-eval",
                 "--tasks", str(task_list), "--batch_size", "16", "--max_new_tokens", "6", "--device", "cpu"]) == 0
    [results_file] = out.glob("results_*.json")
    results = json.loads(results_file.read_text())
    per_language = results["per_language"]
    assert sorted(per_language) == sorted(SHIPPED_MEMBERS)  # hi etc. occur in two benchmarks: keys are tasks

    model, tokenizer = load_model(str(model_dir), device="cpu")
    expected, extracted = {}, {}
    for k, lang in enumerate(MMLU_LANGS):
        rows = truth[f"global_mmlu_full_{lang}"]
        items = [EvalItem(r["sample_id"], lang, r["question"], "ABCD".index(r["answer"]),
                          [r["option_a"], r["option_b"], r["option_c"], r["option_d"]]) for r in rows]
        expected[f"global_mmlu_full_{lang}"] = ("acc", [s["acc"] for s in score_mc(model, tokenizer, items)])
        bele = truth[f"belebele_{BELEBELE[lang]}"]
        items = [EvalItem(r["link"], lang, r["question"], int(r["correct_answer_num"]) - 1,
                          [r[f"mc_answer{j}"] for j in range(1, 5)], passage=r["flores_passage"]) for r in bele]
        expected[f"belebele_{BELEBELE[lang]}"] = ("acc", [s["acc"] for s in score_mc(model, tokenizer, items)])
        scores = []
        for r in truth[f"mgsm_direct_{lang}"]:
            prompt = MGSM_QUESTION[lang] + r["question"] + "\nAnswer:"
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                new = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     top_k=None, top_p=None)[0, ids["input_ids"].shape[1]:]
            text = tokenizer.decode(new, skip_special_tokens=True)
            for stop in MGSM_STOPS[lang]:
                text = text.split(stop)[0]
            scores.append(float(_flexible_extract(text) == str(r["answer_number"])))
            extracted.setdefault(f"mgsm_direct_{lang}", []).append(_flexible_extract(text))
        expected[f"mgsm_direct_{lang}"] = ("exact_match", scores)

    for name, (metric, scores) in expected.items():
        entry = per_language[name]
        assert entry["n"] == len(scores), name
        assert entry[metric] == pytest.approx(sum(scores) / len(scores), abs=1e-9), name
    assert per_language["global_mmlu_full_hi"]["n"] == len(_subjects())  # one item in each of the 57 subjects
    means = results["benchmark_means"]
    assert set(means) == {"global_mmlu_full", "belebele", "mgsm_direct"}
    for benchmark, (metric, count) in {"global_mmlu_full": ("acc", 57), "belebele": ("acc", 6),
                                       "mgsm_direct": ("exact_match", 4)}.items():
        names = [n for n in SHIPPED_MEMBERS if n.startswith(benchmark)]
        assert means[benchmark]["metric"] == metric and means[benchmark]["tasks"] == names
        golden = sum(sum(expected[n][1]) / count for n in names) / len(names)
        assert means[benchmark]["mean"] == pytest.approx(golden, abs=1e-9)
    samples = [json.loads(line) for line in (out / results["samples_file"]).open()]
    mgsm_rows = [s for s in samples if s["lang"] == "mgsm_direct_hi"]
    assert len(mgsm_rows) == 4  # one filter's samples (flexible-extract), not one per filter
    for name, ours in extracted.items():  # lm-eval's extracted answer per item = ours from model.generate
        rows = sorted((s for s in samples if s["lang"] == name), key=lambda s: int(s["id"].rsplit("/", 1)[1]))
        theirs = [_flexible_extract(s["prediction"][0]) if s["prediction"][0] != "[invalid]" else "[invalid]"
                  for s in rows]
        assert theirs == ours, name


def test_mgsm_hi_without_a_dataset_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'sara-moe[eval]')")
    monkeypatch.delenv("SARA_MGSM_HI", raising=False)
    code = main(["eval", "--model", str(tiny_model_dir("qwen3_moe")), "--output_dir", str(tmp_path / "o"),
                 "--backend", "lm-eval", "--tasks", "mgsm_direct_hi", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "SARA_MGSM_HI=PATH" in err and err.startswith("sara eval: error: mgsm_direct_hi")
