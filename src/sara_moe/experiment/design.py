"""The study's design in one place: world kinds, arms, eval splits and the world-validity rule.

    from sara_moe.experiment.design import ARMS, CLONE, VALIDITY, WORLD_KINDS

Every module of `experiment/` reads these constants from here (none defines its own copy),
so `run`, `arms`, `select` and `report` agree on what an arm or a valid world is.
"""

WORLD_KINDS = {
    "plain": dict(num_experts=8, route_weight=0.0),
    "routed_lang": dict(num_experts=8, route_weight=0.5, route_by="lang", route_layers=[1, 2]),
    "routed_topic": dict(num_experts=16, route_weight=0.5, route_by="lang_topic", route_layers=[1, 2]),
}
# Pretraining runs until the base model knows the English dev facts (`learn_until`, the schedule of
# `testbed.pretrain.KnowledgeGate`), at most `max_steps`. Until 2026-12-03 it was a cosine schedule of
# 1200 steps: a world whose model left its loss plateau late (step 600 and more, against 200-400 for
# most) met a decayed learning rate and stayed half-learned, and about one world in five was invalid.
# The clone writes each clause with adjacent words exchanged (`swap`), as languages differ in word order; with
# English's order, a world without the routing knob (`plain`) transferred nearly every English-only fact (13 of 20
# seeds above the validity ceiling, 2026-12-03) and left no room for a transfer gain. The cool-down is 100 steps:
# knowledge stays at 100% after it, and 200 steps fewer keep the demo within its time.
WORLD_BASE = dict(clones=[{"name": "clone", "share": 0.2, "entities": "shared", "swap": True}], max_steps=3000,
                  learn_until=0.95, check_every=100, cooldown_steps=100)
CLONE = "clone"
ARMS = ("base", "sft", "sara", "sara_shuffled", "sara_mean", "sara_topic_shuffled", "kl", "steer")
PRIOR_ARMS = {"sara": "own", "sara_shuffled": "shuffled", "sara_mean": "mean", "sara_topic_shuffled": "topic_shuffled",
              "kl": "own"}
SPLITS = ("shared", "en_only")
# A world can answer the question when its base model knows the English facts (both splits, scored
# in the pretraining form: `experiment.arms.knowledge_scores`) and its clone is not already at
# ceiling on the English-only facts. Until 2026-11-26 the first test read the base model's templated
# accuracy on English shared facts (`en_shared_min`, still accepted); that mixes in whether the base
# model can read an instruction template it never saw: bases scoring 19.8-62.5% there knew 94.8-100%
# of the same facts as sentences (docs/testbed.md, "World validity").
VALIDITY = {"en_knowledge_min": 0.90, "clone_en_only_max": 0.95}
