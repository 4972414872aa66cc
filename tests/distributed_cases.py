"""What the one-process reference and the torchrun ranks of tests/test_distributed.py share."""

from __future__ import annotations

from sara_moe.train import SaraConfig


def sara_config(output_dir, model_dir, corpus, priors, **overrides) -> SaraConfig:
    base = dict(output_dir=str(output_dir), model_name_or_path=str(model_dir), data=str(corpus), priors=str(priors),
                report_to="none", max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                gradient_checkpointing=False, disable_tqdm=True, seed=0, learning_rate=1e-3,
                lr_scheduler_type="constant", dataloader_num_workers=0, lambda_js=1.5, train_anchor=True,
                use_cpu=True, router_aux_loss_coef=0.0)
    return SaraConfig(**{**base, **overrides})


def global_batch_rows(dataset) -> list[int]:
    """4 dataset rows: 3 with an anchor and 1 without, split 2|2 so the ranks hold 2 and 1 valid examples.

    Unequal valid counts per rank are the case where a per-rank mean would differ from the
    global batch's mean.
    """
    has = dataset["sara_has_anchor"]
    valid = [i for i, flag in enumerate(has) if flag][:3]
    invalid = [i for i, flag in enumerate(has) if not flag][:1]
    return valid[:2] + [valid[2], invalid[0]]
