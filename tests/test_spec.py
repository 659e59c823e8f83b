"""The pipeline language: parsing, canonical form, files, sweep expansion."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmmsqueeze
from lmmsqueeze.compose import expand_lists, parse_pipeline
from lmmsqueeze.compose.spec import PipelineSpec, StageSpec
from lmmsqueeze.errors import PipelineError


def test_parse_values_keep_their_types():
    spec = parse_pipeline('fastv(layer=2, keep=0.5) | random(keep=1, seed=3) | x(flag=true, s="a b", t=word)')
    assert [s.name for s in spec.stages] == ["fastv", "random", "x"]
    assert spec.stages[0].params == {"layer": 2, "keep": 0.5}
    assert isinstance(spec.stages[1].params["keep"], int)
    assert spec.stages[2].params == {"flag": True, "s": "a b", "t": "word"}


@pytest.mark.parametrize("text", ["", "  ", "none", "NONE"])
def test_empty_pipeline_is_vanilla(text):
    assert parse_pipeline(text) == PipelineSpec()
    assert lmmsqueeze.compile(text).canonical == "none"


def test_canonical_fills_defaults_and_sorts_keys():
    plan = lmmsqueeze.compile("fastv(layer=3) | random(seed=1, layer=5, keep=4)")
    assert plan.canonical == "fastv(keep=0.5, layer=3) | random(keep=4, layer=5, seed=1)"
    # the canonical string is a fixed point
    assert lmmsqueeze.compile(plan.canonical).canonical == plan.canonical
    assert lmmsqueeze.compile("fastv").canonical == "fastv(keep=0.5, layer=2)"


_names = st.sampled_from(["fastv", "random", "pool", "my_stage"])
_keys = st.sampled_from(["keep", "layer", "seed", "mode", "flag"])
_values = st.one_of(
    st.integers(-5, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text("abcxyz_", min_size=1, max_size=6).filter(lambda s: s[0] != "_"),
    st.text("ab c=|()\"'", min_size=0, max_size=6),
)


@given(st.lists(st.tuples(_names, st.dictionaries(_keys, _values, max_size=3)), min_size=1, max_size=4))
def test_format_parse_round_trip(stages):
    spec = PipelineSpec(tuple(StageSpec(n, p) for n, p in stages))
    assert parse_pipeline(spec.format()) == spec


def test_files_give_the_same_pipeline(tmp_path):
    text = "pool | fastv(layer=2, keep=0.5)"
    stages = [{"name": "pool"}, {"name": "fastv", "layer": 2, "keep": 0.5}]
    (tmp_path / "p.json").write_text(json.dumps(stages))
    (tmp_path / "p.yaml").write_text("- name: pool\n- {name: fastv, layer: 2, keep: 0.5}\n")
    (tmp_path / "q.yaml").write_text("pipeline:\n  - pool\n  - fastv(layer=2, keep=0.5)\n")
    expected = lmmsqueeze.compile(text).canonical
    for f in ("p.json", "p.yaml", "q.yaml"):
        assert lmmsqueeze.compile(f"@{tmp_path / f}").canonical == expected


def test_expand_lists_gives_one_pipeline_per_combination():
    specs = expand_lists(parse_pipeline("fastv(keep=[0.25, 0.5, 0.75]) | random(layer=5, seed=[0, 1])"))
    assert [s.format() for s in specs] == [
        f"fastv(keep={k}) | random(layer=5, seed={s})" for k in (0.25, 0.5, 0.75) for s in (0, 1)
    ]


@pytest.mark.parametrize("text", ["fastv(", "fastv(keep)", "fastv keep", "| pool", "pool |", "a(b=[])",
                                  "a(b=[[1]])", "fastv(keep=0.5 layer=2)", "pool $"])
def test_syntax_errors_are_one_line(text):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    assert "\n" not in str(err.value) and "cannot parse pipeline" in str(err.value)


# --- quoted values, long pipelines, pipeline files (one-line errors) -------------------------------


@given(st.text(max_size=30))
def test_any_string_value_round_trips_through_its_canonical_form(value):
    """Every string (quotes, backslashes, control and non-ASCII characters, beyond U+FFFF) parses back
    to itself from the form the canonical pipeline writes."""
    spec = PipelineSpec((StageSpec("fastv", {"tag": value}),))
    assert parse_pipeline(spec.format()).stages[0].params["tag"] == value


@pytest.mark.parametrize("text, escape", [
    ('fastv(tag="a\\x41")', "\\x41"), ('fastv(tag="\\u12")', "\\u12"), ("fastv(tag='\\q')", "\\q"),
    ('fastv(tag="\\N{DASH}")', "\\N{DAS"),
])
def test_a_bad_escape_is_refused_naming_it_and_the_valid_ones(text, escape):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    assert f"bad escape {escape!r} in a quoted value; valid escapes:" in str(err.value)


def test_a_huge_bad_pipeline_is_echoed_clipped_around_the_error():
    text = "fastv(keep=0.5) | " * 5000 + "fastv(keep=))"
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    message = str(err.value)
    assert len(message) < 400 and "..." in message and f"({len(text)} characters)" in message
    assert "keep=))" in message  # the clip is centred on the error's column


@pytest.mark.parametrize("name, content, message", [
    ("p.yaml", b"- name: fastv\n  keep: [0.5\n", "is not valid YAML (line 3, column 1)"),
    ("p.yaml", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("p.yaml", b"  \n", "is empty"),
    ("p.json", b"{", "is not valid JSON"),
    ("p.yaml", b"- '@p.yaml'\n", "names another pipeline file"),
    ("p.yaml", b"{name: fastv}\n", "expected a list of stages"),
    ("p.yaml", b"- name: fastv\n  1: 2\n", "parameter name 1 is not a word"),
])
def test_bad_pipeline_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_pipeline(f"@{tmp_path / name}")
    assert "\n" not in str(err.value)
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(PipelineError, match="is a directory"):
        parse_pipeline(f"@{tmp_path / 'd.yaml'}")
