"""The cloned-language world of `sara testbed`: pure-Python generation, no torch.

    from sara_moe.testbed.world import World, Clone
    world = World(seed=0, num_persons=96, clones=[Clone("c1", entities="separate"), Clone("c2")])
    words = world.fact_sentence(person=5, attr="city", template=0)   # ["p5", "lives", "in", "c3", "."]
    world.translate(words, "c1"); world.back_translate(world.translate(words, "c1"), "c1") == words

English-like base language: persons `p0..` with four attributes (city `c*`, food `f*`, job
`j*`, colour `k*`), two sentence templates per attribute, question templates, and additions
over number words `n0..`. A clone copies every *function word* into a fresh pseudo-word of its
own (a disjoint vocabulary); *entity tokens* (persons, values, numbers) are shared with
English (`entities="shared"`) or copied too (`"separate"`: pseudo stem + the same digits, so
numeric answers still extract). Optional `swap` exchanges adjacent words inside each clause and
`split` writes every word as two pieces (`ab@@ cd`), a different tokenisation. Translation is
exact and invertible token by token (`back_translate`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ATTRS = {  # attribute -> (value prefix, number of values)
    "city": ("c", 16), "food": ("f", 12), "job": ("j", 12), "colour": ("k", 10)}
TEMPLATES = {
    "city": ["{p} lives in {v} .", "the home of {p} is {v} ."],
    "food": ["{p} likes to eat {v} .", "the favourite food of {p} is {v} ."],
    "job": ["{p} works as a {v} .", "the job of {p} is {v} ."],
    "colour": ["{p} loves the colour {v} .", "the favourite colour of {p} is {v} ."],
}
QUESTIONS = {
    "city": "where does {p} live ?", "food": "what does {p} like to eat ?",
    "job": "what is the job of {p} ?", "colour": "which colour does {p} love ?",
}
ANSWER_PREFIX = "answer :"
ADDITION = "{a} plus {b} equals {c} ."
ADD_QUESTION = "what is {a} plus {b} ?"
ENTITY = re.compile(r"^([a-z])(\d+)$")
CLAUSE_END = {".", "?", ":"}
PIECE = "@@"
CONSONANTS, VOWELS = "bdgklmnprstvz", "aeiou"


@dataclass
class Clone:
    """One clone language. `share`: its fraction of pretraining documents (English gets the rest)."""

    name: str
    share: float = 0.1
    entities: str = "shared"  # shared | separate
    swap: bool = False
    split: bool = False

    def __post_init__(self):
        if self.entities not in ("shared", "separate"):
            raise ValueError(f"clone {self.name}: entities must be 'shared' or 'separate', got {self.entities!r}")
        if not 0 <= self.share < 1:
            raise ValueError(f"clone {self.name}: share must be in [0, 1), got {self.share}")


class World:
    def __init__(self, seed: int, num_persons: int, clones: list[Clone], max_number: int = 20):
        self.seed, self.num_persons, self.max_number = seed, num_persons, max_number
        self.clones = {c.name: c for c in clones}
        if "en" in self.clones:
            raise ValueError("a clone cannot be called 'en'")
        rng = random.Random(seed)
        self.facts = {(p, a): rng.randrange(n) for p in range(num_persons) for a, (_, n) in ATTRS.items()}
        self.function_words = sorted({w for texts in (*TEMPLATES.values(), QUESTIONS.values(), [ADDITION, ADD_QUESTION,
                                      ANSWER_PREFIX]) for t in texts for w in t.split() if not w.startswith("{")})
        self.stems = sorted({"p", "n", *(prefix for prefix, _ in ATTRS.values())})
        used = set(self.function_words) | set(self.stems)
        self.maps: dict[str, dict[str, str]] = {}
        for name in sorted(self.clones):
            crng = random.Random(f"{seed}:{name}")
            mapping = {}
            for word in self.function_words + [f"<stem>{s}" for s in self.stems]:
                while True:
                    syllables = 1 if word.startswith("<stem>") else crng.choice([2, 2, 3])
                    new = "".join(crng.choice(CONSONANTS) + crng.choice(VOWELS) for _ in range(syllables))
                    if new not in used and not ENTITY.match(new):
                        used.add(new)
                        mapping[word] = new
                        break
            self.maps[name] = mapping
        self.inverse = {name: {v: k for k, v in m.items()} for name, m in self.maps.items()}

    # --------------------------------------------------------------- English
    def person(self, p: int) -> str:
        return f"p{p}"

    def value(self, attr: str, index: int) -> str:
        return f"{ATTRS[attr][0]}{index}"

    def fact_sentence(self, person: int, attr: str, template: int = 0, value: int | None = None) -> list[str]:
        v = self.facts[(person, attr)] if value is None else value
        return TEMPLATES[attr][template].format(p=self.person(person), v=self.value(attr, v)).split()

    def question(self, person: int, attr: str) -> list[str]:
        return QUESTIONS[attr].format(p=self.person(person)).split()

    def answer(self, person: int, attr: str, value: int | None = None) -> list[str]:
        return ANSWER_PREFIX.split() + self.fact_sentence(person, attr, 0, value)

    def addition(self, a: int, b: int) -> list[str]:
        return ADDITION.format(a=f"n{a}", b=f"n{b}", c=f"n{a + b}").split()

    # --------------------------------------------------------------- clones
    def _word(self, word: str, lang: str) -> str:
        m = ENTITY.match(word)
        if m:
            if self.clones[lang].entities == "shared":
                return word
            return self.maps[lang][f"<stem>{m.group(1)}"] + m.group(2)
        return self.maps[lang][word]

    def _unword(self, word: str, lang: str) -> str:
        inv = self.inverse[lang]
        if word in inv:
            return inv[word]
        if self.clones[lang].entities == "shared" and ENTITY.match(word):
            return word
        m = re.match(r"^([a-z]+?)(\d+)$", word)
        if m and inv.get(m.group(1), "").startswith("<stem>"):
            return inv[m.group(1)][len("<stem>"):] + m.group(2)
        raise ValueError(f"{word!r} is not a word of clone {lang}")

    @staticmethod
    def _swap(words: list[str], labels: list | None = None):
        """Exchange adjacent words inside each clause (an involution; clause ends stay put).

        Clause ends are looked up in `words` as given (in a clone, its own words). With
        `labels`, a parallel list permuted the same way, returns `(words, labels)`."""
        out, clause = [], []
        order = list(range(len(words)))
        for i in order + [None]:
            if i is None or words[i] in CLAUSE_END:
                for j in range(0, len(clause) - 1, 2):
                    clause[j], clause[j + 1] = clause[j + 1], clause[j]
                out.extend(clause)
                clause = []
                if i is not None:
                    out.append(i)
            else:
                clause.append(i)
        if labels is None:
            return [words[i] for i in out]
        return [words[i] for i in out], [labels[i] for i in out]

    @staticmethod
    def _split(word: str) -> list[str]:
        if len(word) < 2:
            return [word]
        cut = (len(word) + 1) // 2
        return [word[:cut] + PIECE, word[cut:]]

    def translate(self, words: list[str], lang: str) -> list[str]:
        if lang == "en":
            return list(words)
        clone = self.clones[lang]
        out = [self._word(w, lang) for w in words]
        if clone.swap:
            out = self._swap(out)
        if clone.split:
            out = [piece for w in out for piece in self._split(w)]
        return out

    def back_translate(self, words: list[str], lang: str) -> list[str]:
        if lang == "en":
            return list(words)
        clone = self.clones[lang]
        if clone.split:
            merged, buf = [], ""
            for w in words:
                if w.endswith(PIECE):
                    buf += w[:-len(PIECE)]
                else:
                    merged.append(buf + w)
                    buf = ""
            words = merged
        if clone.swap:
            words = self._swap(list(words))
        return [self._unword(w, lang) for w in words]

    def vocabulary(self) -> list[str]:
        """Every word any language of this world can write (sorted, deterministic)."""
        english = set(self.function_words)
        english.update(self.person(p) for p in range(self.num_persons))
        english.update(self.value(a, i) for a, (_, n) in ATTRS.items() for i in range(n))
        english.update(f"n{i}" for i in range(2 * self.max_number + 1))
        vocab = set(english)
        for lang, clone in self.clones.items():
            for w in english:
                t = self._word(w, lang)
                vocab.update(self._split(t) if clone.split else [t])
        return sorted(vocab)

    def bio_sentences(self, person: int, attrs: list[str], rng: random.Random) -> list[tuple[str, list[str]]]:
        """A document listing some of a person's facts in shuffled order, random templates, as
        `(attribute, English words)` per sentence: the attribute is the sentence's topic label."""
        order = list(attrs)
        rng.shuffle(order)
        return [(attr, self.fact_sentence(person, attr, rng.randrange(len(TEMPLATES[attr])))) for attr in order]

    def translate_labeled(self, sentences: list[tuple[str, list[str]]], lang: str) -> tuple[list[str], list[str]]:
        """`translate` of the concatenated sentences, plus each output word's topic label
        (the label of the English word it came from; pieces of a split word share it)."""
        words = [w for _, sentence in sentences for w in sentence]
        labels = [topic for topic, sentence in sentences for _ in sentence]
        if lang == "en":
            return words, labels
        clone = self.clones[lang]
        out = [self._word(w, lang) for w in words]
        if clone.swap:
            out, labels = self._swap(out, labels)
        if clone.split:
            pairs = [(piece, label) for w, label in zip(out, labels) for piece in self._split(w)]
            out, labels = [w for w, _ in pairs], [label for _, label in pairs]
        return out, labels
