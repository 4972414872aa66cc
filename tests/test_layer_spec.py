"""`architectures.parse_layer_spec`, the one parser of layer specs (train's align_layers, steer's --layers)."""

from __future__ import annotations

import json

import pytest

from sara_moe.architectures import LayerSpecError, layer_runs, parse_layer_spec, resolve_layer_spec

# a 48-layer model whose first 3 layers are dense (DeepSeek-V3 style)
MOE = list(range(3, 48))


def parse(spec, **kw):
    return parse_layer_spec(spec, MOE, 48, field_name="field align_layers", **kw)


def test_ranges_lists_and_yaml_lists():
    assert parse("7-34") == list(range(7, 35))
    assert parse(" 7 - 9 ") == [7, 8, 9]
    assert parse("3,5,7") == [3, 5, 7]
    assert parse("[7, 5, 5]") == [5, 7]  # sorted, deduplicated
    assert parse([12, 3]) == [3, 12]
    assert parse(["3", "10-11"]) == [3, 10, 11]
    assert parse("3,10-11") == [3, 10, 11]
    assert parse(9) == [9]


def test_negative_indices_count_decoder_layers_from_the_end():
    assert parse("-1") == [47]
    assert parse("-3--1") == [45, 46, 47]
    assert parse("40--6") == [40, 41, 42]
    assert parse([-48 + 5]) == [5]


def test_a_range_skips_dense_layers_but_a_listed_dense_layer_is_an_error():
    assert parse("0-4") == [3, 4]
    with pytest.raises(LayerSpecError, match=r"^field align_layers: layer\(s\) \[0, 2\] are dense \(no router\) "
                                             r"and cannot be aligned or steered; MoE layers are 3-47 of 48 decoder layers$"):
        parse("0,2,5")
    with pytest.raises(LayerSpecError, match=r"range '0-2' holds no MoE layer"):
        parse("0-2")


def test_out_of_range_reversed_empty_and_garbage_are_one_line_errors():
    cases = {
        "48": "layer 48 is out of range; the model has decoder layers 0..47 (-48..-1 from the end)",
        "-49": "layer -49 is out of range",
        "3-60": "layer 60 is out of range",
        "9-7": "range '9-7' runs backwards (layers 9 to 7); write the lower layer first",
        "": "empty layer spec; give auto | middle",
        " , ": "empty layer spec",
        "[]": "empty layer spec",
        "seven": "'seven' is not a layer; give auto | middle",
        "3;4": "'3;4' is not a layer",
        "1.5": "'1.5' is not a layer",
    }
    for spec, message in cases.items():
        with pytest.raises(LayerSpecError) as err:
            parse(spec)
        text = str(err.value)
        assert text.startswith("field align_layers: ") and message in text and "\n" not in text, (spec, text)
    with pytest.raises(LayerSpecError, match=r"True is not a layer"):
        parse([True])
    with pytest.raises(LayerSpecError, match=r"\{'a': 1\} is not a layer spec"):
        parse({"a": 1})


def test_layer_runs_write_a_list_as_the_spec_that_names_it():
    assert layer_runs([5, 1, 2, 3, 9, 10]) == "1-3,5,9-10" and parse(layer_runs([5, 1, 2, 3, 9, 10])) == [3, 5, 9, 10]


def test_auto_and_middle(tmp_path):
    band = [i for i in MOE if 7 <= i < 35]  # the paper's band at 48 layers
    assert parse("auto") == band and parse(None) == band and parse("middle") == band
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps({"recommended_layers": [10, 11]}))
    assert parse("auto", analysis=str(analysis)) == [10, 11]
    assert parse("auto", analysis={"recommended_layers": [-1]}) == [47]
    assert parse("middle", analysis=str(analysis)) == band  # middle ignores the analysis
    with pytest.raises(LayerSpecError, match=r"dense \(no router\)"):
        parse("auto", analysis={"recommended_layers": [1]})
    with pytest.raises(LayerSpecError, match=r"auto needs recommended_layers in analysis; rerun `sara analyze`"):
        parse("auto", analysis={"moe_layers": [3]})
    with pytest.raises(LayerSpecError, match=r"auto cannot read .*missing\.json"):
        parse("auto", analysis=str(tmp_path / "missing.json"))


def test_resolve_against_a_model_with_a_dense_first_layer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("deepseek_v3"))  # 4 layers, layer 0 dense
    assert resolve_layer_spec(model, "0-3") == [1, 2, 3]
    assert resolve_layer_spec(model, "-2--1") == [2, 3]
    assert resolve_layer_spec(model, "auto") == [1, 2]
    with pytest.raises(LayerSpecError, match=r"^--layers: layer 4 is out of range"):
        resolve_layer_spec(model, "1,4", field_name="--layers")
