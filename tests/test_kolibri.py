"""`sara corpus kolibri` on a small fake wheel laid out like kolibri 0.19.5 (no network, no real wheel)."""

from __future__ import annotations

import json
import sys
import zipfile

import pytest

from sara_moe.cli import main
from sara_moe.data import kolibri
from sara_moe.data.corpus import read_corpus
from sara_moe.data.kolibri import KolibriError, clean, kolibri_corpus

BUNDLE = "kolibri.plugins.coach.app-messages.json"
BUNDLE2 = "kolibri.plugins.learn.app-messages.json"

# msgid -> English; and per locale dir the translations ("" = untranslated, as in the real wheel)
EN = {
    "A.welcome": "Welcome to your learning facility",
    "A.save": "Save {count, number} {count, plural, one {change} other {changes}}?",
    "A.plural": "{count, plural, one {Coach assigned to class} other {Coaches assigned to class}}",
    "A.copied": "Will be copied to '{classroomName}' now",
    "A.short": "Category",
    "A.html": "Save &amp; <b>finish</b> the quiz",
    "A.same": "Kolibri Data Portal online",
    "A.partial": "Download learning materials for later",
    "A.broken": "Learner improved on several questions",
}
TR = {
    "sw_TZ": {"A.welcome": "Karibu kwenye kituo chako cha kujifunzia",
              "A.save": "Hifadhi {count, number} {count, plural, one {badiliko} other {mabadiliko}}?",
              "A.plural": "{count, plural, one {Mwalimu amepangiwa darasa} other {Walimu wamepangiwa darasa}}",
              "A.copied": "Litanakiliwa kwa '{classroomName}' sasa", "A.short": "Kategoria",
              "A.html": "Hifadhi &amp; <b>maliza</b> zoezi", "A.same": "Kolibri Data Portal online",
              "A.partial": "Pakua nyenzo za kujifunzia baadaye",
              "A.broken": "Mwanafunzi ameboreka kwenye maswali kadhaa"},
    "yo": {"A.welcome": "Ẹ kú àbọ̀ sí ibùdó ẹ̀kọ́ yín",
           "A.save": "", "A.plural": "{count, plural, one {Olùkọ́ kan} other {Àwọn olùkọ́ ti wà ní kíláàsì}}",
           "A.copied": "", "A.short": "Ẹ̀ka", "A.html": "Fi pamọ́ &amp; <i>parí</i> ìdánwò",
           "A.same": "", "A.partial": "",
           "A.broken": "Olùkọ́ ṣe àtúnṣe ní {value, plural,one {}other {other {}}"},
    "bn_BD": {"A.welcome": "আপনার শিক্ষা কেন্দ্রে স্বাগতম",
              "A.save": "", "A.plural": "{count, plural, other {প্রশিক্ষক ক্লাসে যুক্ত হয়েছেন}}",
              "A.copied": "", "A.short": "বিভাগ", "A.html": "সংরক্ষণ &amp; শেষ করুন", "A.same": "",
              "A.partial": "পরে ডাউনলোড করুন", "A.broken": "শিক্ষার্থী কয়েকটি প্রশ্নে উন্নতি করেছেন"},
    "es_419": {}, "es_ES": {},
}


def _write_locale(put):
    put("kolibri/VERSION", "0.19.5\n")
    put("kolibri/locale/language_info.json", "[]")
    put("kolibri/locale/en/LC_MESSAGES/django.mo", "")
    put(f"kolibri/locale/en/LC_MESSAGES/{BUNDLE}", json.dumps(EN))
    # the same id again in a second bundle: kept once
    put(f"kolibri/locale/en/LC_MESSAGES/{BUNDLE2}", json.dumps({"A.welcome": EN["A.welcome"]}))
    for loc, tr in TR.items():
        full = {k: tr.get(k, "") for k in EN}
        put(f"kolibri/locale/{loc}/LC_MESSAGES/{BUNDLE}", json.dumps(full, ensure_ascii=False))
        put(f"kolibri/locale/{loc}/LC_MESSAGES/{BUNDLE2}", json.dumps({"A.welcome": full["A.welcome"]}))


@pytest.fixture
def wheel(tmp_path):
    (tmp_path / "dl").mkdir()
    path = tmp_path / "dl" / "kolibri-0.19.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        _write_locale(zf.writestr)
    return path


@pytest.fixture
def no_kolibri(monkeypatch, tmp_path):
    """No installed kolibri and no cached wheel anywhere."""
    monkeypatch.setattr(kolibri.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SARA_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)


def test_clean_icu_html_whitespace():
    assert clean(EN["A.plural"]) == "Coaches assigned to class"
    assert clean("{ n, plural, one { one item } other { # items }}") is None  # `#` is a placeholder
    assert clean("{n, select, male {He left} other {They left}}") == "They left"
    assert clean(EN["A.save"]) is None  # {count, number} remains: dropped by default
    assert clean(EN["A.save"], "strip") == "Save changes?"
    assert clean(EN["A.copied"], "strip") == "Will be copied to now"
    assert clean(EN["A.html"]) == "Save & finish the quiz"
    assert clean("  many \n  spaces\there ") == "many spaces here"
    assert clean(TR["yo"]["A.broken"]) is None  # malformed braces (real yo string)
    assert clean("{count, plural, one {only one}}") is None  # no `other` branch


def test_corpus_intersection_and_filters(wheel, no_kolibri, tmp_path):
    out = tmp_path / "out" / "corpus.jsonl"
    stats = kolibri_corpus("sw,yo,bn", out, wheel=wheel)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in rows]
    # short "Category" dropped, placeholder strings dropped, yo untranslated/broken groups dropped
    assert ids == ["A.welcome", "A.plural", "A.html"]
    assert rows[1] == {"id": "A.plural", "en": "Coaches assigned to class", "sw": "Walimu wamepangiwa darasa",
                       "yo": "Àwọn olùkọ́ ti wà ní kíláàsì", "bn": "প্রশিক্ষক ক্লাসে যুক্ত হয়েছেন"}
    assert rows[2]["sw"] == "Hifadhi & maliza zoezi"
    assert stats["locales"] == {"sw": "sw_TZ", "yo": "yo", "bn": "bn_BD"}
    assert stats["groups"] == 3 and stats["written"] == {"sw": 3, "yo": 3, "bn": 3}
    assert stats["translated"]["sw"] == 5  # welcome, plural, html, partial, broken ("same" equals English)
    assert stats["dropped_english"]["too_short"] == 1
    saved = json.loads((tmp_path / "out" / "corpus.stats.json").read_text())
    assert saved["groups"] == 3 and saved["kolibri_version"] == "0.19.5"
    groups = list(read_corpus(out, anchor="en"))
    assert [g.id for g in groups] == ids
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_partial_min_words_and_strip(wheel, no_kolibri, tmp_path):
    out = tmp_path / "p.jsonl"
    stats = kolibri_corpus(["sw", "bn"], out, wheel=wheel, allow_partial=True, min_words=1, placeholders="strip")
    rows = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert rows["A.short"]["sw"] == "Kategoria"  # min_words=1 keeps it
    assert rows["A.save"] == {"id": "A.save", "en": "Save changes?", "sw": "Hifadhi mabadiliko?"}  # bn missing
    assert "A.same" not in rows  # translation equal to English
    assert stats["written"]["bn"] < stats["groups"]
    assert len(list(read_corpus(out, anchor="en"))) == len(rows)


def test_codes_errors_and_sources(wheel, no_kolibri, tmp_path, monkeypatch, capsys):
    with pytest.raises(KolibriError, match=r"'xx' is not available; available: .*sw_TZ"):
        kolibri_corpus("sw,xx", tmp_path / "c.jsonl", wheel=wheel)
    with pytest.raises(KolibriError, match="ambiguous"):
        kolibri_corpus("es", tmp_path / "c.jsonl", wheel=wheel)
    assert kolibri_corpus("es_419,sw_TZ", tmp_path / "c.jsonl", wheel=wheel, allow_partial=True)["locales"] == {
        "es_419": "es_419", "sw_TZ": "sw_TZ"}
    with pytest.raises(ValueError, match=r"c\.jsonl exists; choose another output or pass --overwrite"):
        kolibri_corpus("sw", tmp_path / "c.jsonl", wheel=wheel)
    with pytest.raises(KolibriError, match=r"pip download --no-deps kolibri==0\.19\.5"):
        kolibri_corpus("sw", tmp_path / "c4.jsonl")
    assert not (tmp_path / "c2.jsonl").exists()
    # CLI: one-line error, exit 1
    assert main(["corpus", "kolibri", "--langs", "sw", "--output", str(tmp_path / "c2.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip download" in err and not (tmp_path / "c2.jsonl").exists()
    # a wheel in the cache dir is found without --wheel
    monkeypatch.setenv("SARA_CACHE", str(wheel.parent))
    assert main(["corpus", "kolibri", "--langs", "sw,bn", "--output", str(tmp_path / "c3.jsonl")]) == 0
    assert "sw (sw_TZ)" in capsys.readouterr().err


def test_installed_package_is_read(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "kolibri").mkdir(parents=True)
    (site / "kolibri" / "__init__.py").write_text("raise ImportError('must not be imported')\n")

    def put(name, text):
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    _write_locale(put)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "kolibri", raising=False)
    stats = kolibri_corpus("sw", tmp_path / "i.jsonl")
    assert stats["source"] == str(site / "kolibri") and stats["groups"] >= 3
