"""Real parallel text offline: a corpus from the human-translated UI strings of PyPI `kolibri`.

    pip download --no-deps kolibri==0.19.5 -d ~/.cache/sara-moe      # once, ~104 MB
    sara corpus kolibri --langs sw,yo,ha,ny,te,bn --output corpus.jsonl [--wheel PATH]
        [--min_words 3] [--allow_partial] [--placeholders drop|strip]

    from sara_moe.data.kolibri import kolibri_corpus
    stats = kolibri_corpus(["sw", "yo"], "corpus.jsonl", wheel="kolibri-0.19.5-py2.py3-none-any.whl")

Kolibri ships `kolibri/locale/<dir>/LC_MESSAGES/<bundle>-messages.json`, one flat
`{message id: text}` object per bundle and locale; `en` holds the English sources, and an
untranslated message repeats the English. The source is the installed `kolibri` package when
importable (found, never imported), else `--wheel`, else a `kolibri-*.whl` in
`$SARA_CACHE`, `~/.cache/sara-moe` or the working directory; nothing is ever installed.

Cleaning: ICU `plural`/`select` blocks become their `other` branch (dropped when there is
none or the braces are malformed); plain placeholders (`{facilityName}`, `{count, number}`,
`#`) drop the string (`--placeholders drop`, default) or are removed (`strip`); HTML tags
are removed, entities unescaped, whitespace collapsed. A group needs at least `--min-words`
English words; a translation equal to the English is dropped. Without `--allow-partial`
only groups translated in every requested language are kept. Message ids repeated across
bundles, and repeated English texts, are kept once. Output is the canonical corpus
(`{"id": msgid, "en": ..., "sw": ...}`, keys are the codes as given), written atomically,
with counts in `<output stem>.stats.json` and the resolved `KolibriConfig` in
`<output>.config.json` beside it.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sara_moe.runtime import artifacts
from sara_moe.runtime.options import dispatch, parse_config

PIP_HINT = "pip download --no-deps kolibri==0.19.5 -d ~/.cache/sara-moe"
_SUFFIX = "-messages.json"
_PH = "\x00"  # marks where a placeholder stood


class KolibriError(ValueError):
    """One-line user error (bad language code, missing package, bad source)."""


# ---------------------------------------------------------------- source

class _Source:
    """Locale JSON files of one kolibri copy: an installed package dir or a wheel zip."""

    def __init__(self, where: Path, is_wheel: bool):
        self.where, self.is_wheel = where, is_wheel
        if is_wheel:
            try:
                self._zip = zipfile.ZipFile(where)
            except (zipfile.BadZipFile, OSError) as err:
                raise KolibriError(f"{where}: not a readable wheel ({err})") from None
            self._files = {n[len("kolibri/locale/"):]: n for n in self._zip.namelist()
                           if n.startswith("kolibri/locale/") and n.endswith(_SUFFIX)}
        else:
            root = where / "locale"
            self._files = {p.relative_to(root).as_posix(): p for p in root.glob(f"*/LC_MESSAGES/*{_SUFFIX}")}
        if not self._files:
            raise KolibriError(f"{where}: no kolibri/locale/*/LC_MESSAGES/*{_SUFFIX} files; is this a kolibri wheel?")

    def locales(self) -> list:
        return sorted({rel.split("/")[0] for rel in self._files})

    def version(self) -> str:
        try:
            raw = self._zip.read("kolibri/VERSION") if self.is_wheel else (self.where / "VERSION").read_bytes()
            return raw.decode().strip()
        except (KeyError, OSError):
            return "unknown"

    def messages(self, locale: str) -> dict:
        """{msgid: text} over all bundles of a locale; first bundle (sorted) wins a repeated id."""
        out: dict = {}
        for rel in sorted(r for r in self._files if r.split("/")[0] == locale):
            ref = self._files[rel]
            raw = self._zip.read(ref) if self.is_wheel else Path(ref).read_bytes()
            for key, text in json.loads(raw).items():
                if isinstance(text, str):
                    out.setdefault(key, text)
        return out


def find_source(wheel=None) -> _Source:
    if wheel:
        if not Path(wheel).is_file():
            raise KolibriError(f"--wheel {wheel}: no such file; get it with: {PIP_HINT}")
        return _Source(Path(wheel), True)
    spec = importlib.util.find_spec("kolibri")
    if spec and spec.submodule_search_locations:
        pkg = Path(list(spec.submodule_search_locations)[0])
        if (pkg / "locale").is_dir():
            return _Source(pkg, False)
    dirs = [os.environ.get("SARA_CACHE"), Path.home() / ".cache" / "sara-moe", Path.cwd()]
    for d in dirs:
        if d and Path(d).is_dir():
            found = sorted(Path(d).glob("kolibri-*.whl"))
            if found:
                return _Source(found[-1], True)
    raise KolibriError(f"kolibri is not installed and no wheel found (--wheel, $SARA_CACHE, ~/.cache/sara-moe, .); "
                       f"run: {PIP_HINT}")


def map_codes(codes, locales) -> dict:
    """User code -> locale dir: exact dir name, else the single dir whose language part matches."""
    available = [loc for loc in locales if loc != "en"]
    out = {}
    for code in codes:
        if code in available:
            out[code] = code
            continue
        hits = [loc for loc in available if loc.split("_")[0].lower() == code.lower().replace("-", "_").split("_")[0]]
        if code.lower() == "en" or len(hits) != 1:
            why = "is ambiguous (" + ", ".join(hits) + ")" if len(hits) > 1 else "is not available"
            if code.lower() == "en":
                why = "is the English anchor, always included"
            raise KolibriError(f"language {code!r} {why}; available: {', '.join(available)}")
        out[code] = hits[0]
    return out


# ---------------------------------------------------------------- cleaning

def _match_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at start, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _resolve_icu(text: str, in_plural: bool = False):
    """Replace ICU arguments: plural/select -> `other` branch, placeholders -> _PH; None if malformed."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "}":
            return None
        if ch == "#" and in_plural:
            out.append(_PH)
            i += 1
            continue
        if ch != "{":
            out.append(ch)
            i += 1
            continue
        end = _match_brace(text, i)
        if end < 0:
            return None
        body = text[i + 1:end]
        parts = body.split(",", 2)
        kind = parts[1].strip() if len(parts) > 1 else ""
        if kind in ("plural", "select", "selectordinal"):
            if len(parts) < 3:
                return None
            branch = _other_branch(parts[2])
            if branch is None:
                return None
            inner = _resolve_icu(branch, in_plural=kind != "select")
            if inner is None:
                return None
            out.append(inner)
        elif "{" in body:
            return None
        else:
            out.append(_PH)
        i = end + 1
    return "".join(out)


def _other_branch(options: str):
    """The text of the `other {...}` option in `one {a} other {b}`, or None."""
    i = 0
    while i < len(options):
        m = re.compile(r"\s*(offset:\d+\s*)?([^\s{}]+)\s*\{").match(options, i)
        if not m:
            return None
        start = m.end() - 1
        end = _match_brace(options, start)
        if end < 0:
            return None
        if m.group(2) == "other":
            return options[start + 1:end]
        i = end + 1
    return None


def clean(text: str, placeholders: str = "drop"):
    """Cleaned plain text, or None when the string must be dropped."""
    resolved = _resolve_icu(text)
    if resolved is None:
        return None
    if _PH in resolved:
        if placeholders == "drop":
            return None
        resolved = resolved.replace(_PH, " ")
        resolved = re.sub(r"\(\s*\)|'\s*'|\"\s*\"", " ", resolved)
    resolved = html.unescape(re.sub(r"<[^<>]+>", " ", resolved))
    resolved = re.sub(r"\s+", " ", resolved).strip()
    resolved = re.sub(r"\s+([,.;:!?)])", r"\1", resolved)
    return resolved or None


# ---------------------------------------------------------------- corpus

def kolibri_corpus(langs, output, wheel=None, min_words: int = 3, allow_partial: bool = False,
                   placeholders: str = "drop", source=None, overwrite: bool = False) -> dict:
    """Write the parallel corpus to `output`; return (and write beside it) the stats dict."""
    if placeholders not in ("drop", "strip"):
        raise KolibriError(f"placeholders must be 'drop' or 'strip', not {placeholders!r}")
    artifacts.refuse_existing(output, overwrite)
    codes = [c.strip() for c in (langs.split(",") if isinstance(langs, str) else langs) if c.strip()]
    if not codes:
        raise KolibriError("--langs needs at least one language code")
    src = source or find_source(wheel)
    locales = src.locales()
    if "en" not in locales:
        raise KolibriError(f"{src.where}: no English locale 'en' in kolibri/locale")
    dirs = map_codes(codes, locales)
    english = src.messages("en")
    trans = {code: src.messages(loc) for code, loc in dirs.items()}

    stats = {"source": str(src.where), "kolibri_version": src.version(), "locales": dirs,
             "min_words": min_words, "placeholders": placeholders, "allow_partial": allow_partial,
             "english_messages": len(english), "english_kept": 0, "dropped_english": {},
             "translated": {c: 0 for c in codes}, "written": {c: 0 for c in codes}, "groups": 0}
    drop = stats["dropped_english"]
    rows, seen_en = [], set()
    for msgid, raw in english.items():
        en = clean(raw, placeholders)
        reason = ("unparsable_or_placeholder" if en is None else "too_short" if len(en.split()) < min_words
                  else "duplicate_english" if en in seen_en else None)
        if reason:
            drop[reason] = drop.get(reason, 0) + 1
            continue
        seen_en.add(en)
        stats["english_kept"] += 1
        row = {"id": msgid, "en": en}
        for code in codes:
            raw_t = trans[code].get(msgid)
            text = clean(raw_t, placeholders) if raw_t else None
            if text and text.casefold() != en.casefold():
                row[code] = text
                stats["translated"][code] += 1
        if len(row) - 2 == len(codes) or (allow_partial and len(row) > 2):
            rows.append(row)
    for row in rows:
        for code in codes:
            stats["written"][code] += code in row
    stats["groups"] = len(rows)

    out = Path(output)
    config = artifacts.config_dict(KolibriConfig(langs=codes, output=str(output), wheel=None if wheel is None else str(wheel),
                                                 min_words=min_words, allow_partial=allow_partial,
                                                 placeholders=placeholders, overwrite=overwrite))
    stats["metadata"] = artifacts.run_metadata(config)
    artifacts.write_json(out.with_name(out.name + ".config.json"), config)
    artifacts.write_jsonl(out, rows, overwrite=overwrite)
    stats_path = out.with_name(out.stem + ".stats.json")
    artifacts.write_json(stats_path, stats)
    stats["stats_path"] = str(stats_path)
    return stats


@dataclass
class KolibriConfig:
    """Options of `sara corpus kolibri` (flags, YAML keys and `kolibri_corpus()` keywords are these names)."""

    langs: list[str] = field(metadata={"help": "language codes, e.g. sw,yo,ha,ny,te,bn (or locale dirs)"})
    output: str = field(metadata={"help": "JSONL path to write (<output>.config.json and <stem>.stats.json beside)"})
    wheel: str | None = field(default=None, metadata={"help": "kolibri wheel, when the package is not installed"})
    min_words: int = field(default=3, metadata={"help": "minimum English words per string"})
    allow_partial: bool = field(default=False, metadata={"help": "keep groups missing some languages"})
    placeholders: str = field(default="drop", metadata={
        "help": "strings with plain ICU placeholders: drop them or remove (strip) the placeholders",
        "choices": ["drop", "strip"]})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})


def kolibri_cli(argv=None) -> int:
    a = parse_config(KolibriConfig, argv, "sara corpus kolibri", __doc__.split("\n\n")[0])
    stats = kolibri_corpus(**asdict(a))
    print(f"kolibri {stats['kolibri_version']} ({stats['source']}): {stats['english_kept']} of "
          f"{stats['english_messages']} English strings kept", file=sys.stderr)
    for code, loc in stats["locales"].items():
        print(f"  {code} ({loc}): {stats['translated'][code]} translated, {stats['written'][code]} written",
              file=sys.stderr)
    print(f"wrote {stats['groups']} groups to {a.output} (stats: {stats['stats_path']})", file=sys.stderr)
    return 0


def corpus_cli(argv=None) -> int:
    return dispatch("sara corpus", "Build a parallel corpus from offline sources.", {
        "kolibri": ("human-translated UI strings of the PyPI package kolibri", kolibri_cli)}, argv)
