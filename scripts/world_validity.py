"""The world-validity sweep: fresh world seeds per world kind through pretraining and the validity check only.

    python scripts/world_validity.py                              # kinds plain, routed_lang, routed_topic; seeds 1000-1019
    python scripts/world_validity.py --seeds 1000-1004 --kinds routed_topic
    python scripts/world_validity.py --output docs/testbed/world_validity.json --work runs/world_validity
    python scripts/world_validity.py --markdown                   # the record as docs/testbed.md's table, no training

Each world is built and pretrained exactly as `sara demo` does (`experiment.run.prepare_world`, the
design's `WORLD_BASE` and `WORLD_KINDS`), its base model scored on the held-out items and checked
against `experiment.design.VALIDITY` (`experiment.run.validity`, dev items only); no prior, no arm.
The record (`--output`) is rewritten atomically after every world, so the sweep is resumable: a world
already recorded with the same config hash is skipped, and a pretrained world in `--work` is read back.
Worlds run seed by seed (every kind of seed 1000, then of 1001, ...), so a stopped sweep covers the
kinds evenly. One CPU thread, as the experiment runs. Two sweeps may share one record (`--reverse`
walks the seeds from the last): each reads the record again before a world and merges before writing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["plain", "routed_lang", "routed_topic"]


def seed_list(text: str) -> list[int]:
    """`1000-1019` or `1000,1003,1007`."""
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def check_world(kind: str, seed: int, work: Path, start: float) -> dict:
    from sara_moe.experiment.design import VALIDITY
    from sara_moe.experiment.run import Recipe, config_hash, prepare_world, run_arm, validity, world_config, world_items

    folder = prepare_world(kind, seed, {}, work / "worlds", start)
    items = world_items(folder / "testbed")
    base = run_arm(folder, "base", 0, Recipe(), work / "runs" / folder.name / "base", items)
    verdict = validity(base["scores"], items, VALIDITY, knowledge=base["knowledge"])
    log = json.loads((folder / "base" / "pretrain_log.json").read_text())
    return {"world": kind, "world_seed": seed, "config_hash": config_hash(world_config(kind, seed)), **verdict,
            "pretrain_steps": log["steps"], "cooldown_from": log.get("cooldown_from"),
            "reached_target": log.get("reached_target"), "knowledge_checks": log.get("knowledge_checks"),
            "pretrain_seconds": log["seconds"], "final_loss": log["final_loss"]}


def tally(worlds: list[dict], kinds: list[str]) -> dict:
    return {kind: {"valid": sum(w["valid"] for w in worlds if w["world"] == kind),
                   "checked": sum(w["world"] == kind for w in worlds)} for kind in kinds}


def short_reason(world: dict) -> str:
    """Why a world failed, in a few words: which test of the rule, with its number."""
    words = []
    for reason in world["reasons"]:
        if "did not learn English" in reason:
            words.append(f"English facts known {100 * world['en_shared_known_dev']:.1f} / "
                         f"{100 * world['en_en_only_known_dev']:.1f}%")
        elif "no room for a transfer gain" in reason:
            words.append(f"clone ceiling {100 * world['clone_en_only_dev']:.1f}%")
        else:
            words.append(reason)
    return "; ".join(words)


def markdown(record: dict) -> str:
    """The record as the table and per-world lines of docs/testbed.md (every number read from the record)."""
    kinds = [k for k in KINDS if any(w["world"] == k for w in record["worlds"])]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["| kind | valid | checked | learned English (>= 90% both splits) | invalid seeds (reason) | "
             "pretraining steps (min-max) |", "|---|---|---|---|---|---|"]
    for kind in kinds:
        ws = [w for w in record["worlds"] if w["world"] == kind]
        learned = sum(min(w["en_shared_known_dev"], w["en_en_only_known_dev"]) >= 0.9 for w in ws)
        bad = ", ".join(f"{w['world_seed']} ({short_reason(w)})" for w in ws if not w["valid"]) or "none"
        steps = [w["pretrain_steps"] for w in ws]
        lines.append(f"| `{kind}` | {sum(w['valid'] for w in ws)} | {len(ws)} | {learned} of {len(ws)} | {bad} | "
                     f"{min(steps)}-{max(steps)} |")
    lines.append("")
    lines.append("Per world (seed: steps, English known shared / en_only %, clone English-only dev %, valid):")
    lines.append("")
    for kind in kinds:
        ws = sorted((w for w in record["worlds"] if w["world"] == kind), key=lambda w: w["world_seed"])
        lines.append(f"- `{kind}`: " + "; ".join(
            f"{w['world_seed']}: {w['pretrain_steps']}, {pct(w['en_shared_known_dev'])}/{pct(w['en_en_only_known_dev'])}"
            f", {pct(w['clone_en_only_dev'])}{'' if w['valid'] else ' x'}" for w in ws))
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from sara_moe.experiment.design import VALIDITY, WORLD_BASE, WORLD_KINDS
    from sara_moe.experiment.run import config_hash, world_config
    from sara_moe.runtime import artifacts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="world kinds, comma-separated")
    parser.add_argument("--seeds", default="1000-1019", help="world seeds: first-last or a comma list")
    parser.add_argument("--output", default=str(ROOT / "docs" / "testbed" / "world_validity.json"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "world_validity"), help="pretrained worlds (cache)")
    parser.add_argument("--reverse", action="store_true", help="walk the seeds from the last (a second sweep)")
    parser.add_argument("--markdown", action="store_true", help="print the record (--output) as markdown and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())))
        return 0
    kinds, seeds = args.kinds.split(","), seed_list(args.seeds)
    unknown = [k for k in kinds if k not in WORLD_KINDS]
    if unknown:
        parser.error(f"--kinds {unknown}: choose from {sorted(WORLD_KINDS)}")
    output, work = Path(args.output), Path(args.work)

    def recorded() -> dict:  # what the record on disk holds for the current config (another sweep may add)
        record = json.loads(output.read_text()) if output.is_file() else {}
        return {(w["world"], w["world_seed"]): w for w in record.get("worlds", [])
                if w["config_hash"] == config_hash(world_config(w["world"], w["world_seed"]))}

    torch.set_num_threads(1)
    start = time.time()
    for seed in (reversed(seeds) if args.reverse else seeds):
        for kind in kinds:
            if (kind, seed) in recorded():
                continue
            t0 = time.time()
            world = {**check_world(kind, seed, work, start), "check_seconds": round(time.time() - t0, 1)}
            done = {**recorded(), (kind, seed): world}  # every world on record, this sweep's seeds or not
            order = {k: i for i, k in enumerate(KINDS)}
            worlds = sorted(done.values(), key=lambda w: (w["world_seed"], order.get(w["world"], len(order))))
            kinds_done = [k for k in KINDS if any(w["world"] == k for w in worlds)]
            artifacts.write_json(output, {
                "what": "fresh world seeds through pretraining and the validity check (dev items only), no arms",
                "command": "python scripts/world_validity.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "validity": VALIDITY, "world_base": WORLD_BASE, "world_kinds": {k: WORLD_KINDS[k] for k in kinds_done},
                "seeds": sorted({w["world_seed"] for w in worlds}), "tally": tally(worlds, kinds_done), "worlds": worlds,
                "metadata": artifacts.run_metadata(seed=None, device="cpu")})
            w = world
            print(f"{kind} seed {seed}: {'valid' if w['valid'] else 'INVALID'} in {w['pretrain_steps']} steps "
                  f"({w['check_seconds']} s); known {w['en_shared_known_dev']:.3f} / {w['en_en_only_known_dev']:.3f}, "
                  f"clone en_only {w['clone_en_only_dev']:.3f}; tally {json.dumps(tally(worlds, kinds_done))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
