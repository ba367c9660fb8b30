"""The rule engine: every row of the default table, flags, rationale, borderline, rules.yaml handling."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from measure_helpers import lesion
from pipeline.errors import InputError
from pipeline.plan.engine import PRIMARIES, load_rules, plan_lesion, plan_study
from pipeline.plan.rules import DEFAULT_RULES_PATH

RULES = load_rules()
SOURCES = {rid: RULES.rules.by_id(rid).source for rid in RULES.rules.ids}


def plan(distance=20.0, diameter=20.0, type="lytic", intent="palliative", solitary=False, location="vertebral_body",
         uncertainty=0.1, rules=RULES):
    return plan_lesion(lesion(distance, diameter, type, location, uncertainty), rules, intent, solitary)


def ids(rec):
    return [c.rule for c in rec.rationale]


# ---- the default decision, row by row -------------------------------------------------------------

@pytest.mark.parametrize("type", ["lytic", "mixed", "blastic"])
@pytest.mark.parametrize("distance", [0.0, 0.6, 1.0])
def test_contact_refers_with_cementoplasty_option(type, distance):
    rec = plan(distance=distance, type=type, intent="curative", solitary=True)
    assert rec.primary == "refer"
    assert rec.options == ["cementoplasty"]
    assert {"posterior_wall_breach", "cement_leak_risk"} <= set(rec.flags)
    assert ids(rec)[0] == "R-CONTACT"
    assert "R-MARGIN" in ids(rec)  # < 5 mm holds too
    assert "thermoprotection_required" not in rec.flags


def test_blastic_far_small_is_cryoablation():
    rec = plan(distance=15.0, diameter=20.0, type="blastic")
    assert (rec.primary, rec.options, rec.flags) == ("cryoablation", [], [])
    assert "R-BLASTIC" in ids(rec) and "R-COLD" not in ids(rec)


def test_blastic_near_gets_cold_protection():
    rec = plan(distance=7.0, diameter=20.0, type="blastic")
    assert rec.primary == "cryoablation"
    assert rec.flags == ["thermoprotection_required"]
    assert {"R-BLASTIC", "R-COLD"} <= set(ids(rec)) and "R-HEAT" not in ids(rec)


def test_blastic_within_margin_is_referred_without_ablation():
    rec = plan(distance=3.0, diameter=20.0, type="blastic")
    assert (rec.primary, rec.options) == ("refer", [])
    assert "R-MARGIN" in ids(rec) and "thermoprotection_required" not in rec.flags


@pytest.mark.parametrize("distance,thermo", [(15.0, False), (7.0, True)])
def test_blastic_large_is_referred_with_palliative_cryo_option(distance, thermo):
    rec = plan(distance=distance, diameter=40.0, type="blastic", intent="curative")
    assert rec.primary == "refer" and rec.options == ["cryoablation"]
    assert "large_lesion" in rec.flags
    assert ("thermoprotection_required" in rec.flags) == thermo
    assert {"R-SIZE", "R-BLASTIC", "R-SOLITARY"} <= set(ids(rec))


@pytest.mark.parametrize("type", ["lytic", "mixed"])
@pytest.mark.parametrize("intent,solitary", [("curative", False), ("palliative", True), ("curative", True)])
def test_lytic_curative_far_is_rfa_plus_cementoplasty(type, intent, solitary):
    rec = plan(distance=15.0, diameter=20.0, type=type, intent=intent, solitary=solitary)
    assert (rec.primary, rec.options, rec.flags) == ("rfa_plus_cementoplasty", [], [])
    assert {"R-LYTIC-RFA", "R-SOLITARY"} <= set(ids(rec)) and "R-HEAT" not in ids(rec)


def test_lytic_curative_near_needs_heat_protection():
    rec = plan(distance=7.0, intent="curative")
    assert rec.primary == "rfa_plus_cementoplasty" and rec.flags == ["thermoprotection_required"]
    heat = next(c for c in rec.rationale if c.rule == "R-HEAT")
    assert "7.0 mm < 10 mm" in heat.text


def test_lytic_palliative_far_is_cementoplasty_with_rfa_option():
    rec = plan(distance=15.0)
    assert (rec.primary, rec.options, rec.flags) == ("cementoplasty", ["rfa_plus_cementoplasty"], [])
    assert "R-LYTIC-RFA" in ids(rec) and "R-SOLITARY" not in ids(rec)


def test_lytic_palliative_near_option_carries_heat_flag():
    rec = plan(distance=7.0)
    assert (rec.primary, rec.options) == ("cementoplasty", ["rfa_plus_cementoplasty"])
    assert rec.flags == ["thermoprotection_required"] and "R-HEAT" in ids(rec)


@pytest.mark.parametrize("intent", ["palliative", "curative"])
def test_lytic_within_margin_is_cementoplasty_only(intent):
    rec = plan(distance=3.0, intent=intent)
    assert (rec.primary, rec.options, rec.flags) == ("cementoplasty", [], [])
    assert "R-MARGIN" in ids(rec) and "R-HEAT" not in ids(rec)
    if intent == "curative":
        blocked = next(c for c in rec.rationale if c.rule == "R-SOLITARY")
        assert "R-MARGIN" in blocked.text and "curative intent" in blocked.text


def test_lytic_large_curative_is_cementoplasty_with_palliative_option():
    rec = plan(distance=15.0, diameter=45.0, intent="curative")
    assert (rec.primary, rec.options) == ("cementoplasty", ["rfa_plus_cementoplasty"])
    assert rec.flags == ["large_lesion"]
    size = next(c for c in rec.rationale if c.rule == "R-SIZE")
    assert "45.0 mm > 30 mm" in size.text
    assert "R-SIZE" in next(c for c in rec.rationale if c.rule == "R-SOLITARY").text


def test_consolidate_only_for_lytic_or_mixed_in_weight_bearing_sites():
    assert "R-CONSOLIDATE" in ids(plan(type="lytic", location="vertebral_body"))
    assert "R-CONSOLIDATE" in ids(plan(type="mixed", location="vertebral_body"))
    assert "R-CONSOLIDATE" not in ids(plan(type="lytic", location="posterior_elements"))
    assert "R-CONSOLIDATE" not in ids(plan(type="lytic", location="other_bone"))
    assert "R-CONSOLIDATE" not in ids(plan(type="blastic", location="vertebral_body"))


def test_no_canal_refers_for_manual_measurement():
    rec = plan(distance=None, type="lytic", intent="curative")
    assert rec.primary == "refer" and rec.options == ["cementoplasty"]
    assert rec.flags == ["distance_unknown"]
    assert ids(rec)[0] == "R-NO-CANAL"
    assert "R-NO-CANAL" in next(c for c in rec.rationale if c.rule == "R-SOLITARY").text
    rec = plan(distance=None, type="blastic")
    assert rec.primary == "refer" and rec.options == []
    assert not rec.borderline["value"]


def test_solitary_comes_from_the_number_of_lesions():
    one = plan_study([lesion(15.0)], RULES, "palliative")
    two = plan_study([lesion(15.0), lesion(25.0, lesion_id=2)], RULES, "palliative")
    assert one[0].primary == "rfa_plus_cementoplasty"
    assert [r.primary for r in two] == ["cementoplasty", "cementoplasty"]
    assert [r.primary for r in plan_study([lesion(15.0), lesion(25.0)], RULES, "curative")] == [
        "rfa_plus_cementoplasty"] * 2
    assert plan_study([], RULES, "curative") == []


def test_unknown_intent_and_type_are_refused():
    with pytest.raises(InputError):
        plan_study([lesion()], RULES, "aggressive")
    with pytest.raises(ValueError):
        plan(type="sclerotic")


def test_every_citation_has_the_yaml_source_and_numbers():
    rec = plan(distance=3.2, diameter=33.0, type="blastic", intent="curative")
    for c in rec.rationale:
        assert c.source == SOURCES[c.rule] and c.text and "{" not in c.text
    margin = next(c for c in rec.rationale if c.rule == "R-MARGIN")
    assert "3.2 mm < 5 mm" in margin.text


def test_invariants_over_a_grid_of_cases():
    r = RULES.rules
    for d, diam, t, intent, sol in itertools.product([None, 0, 0.9, 1.1, 4.9, 5.1, 9.9, 10.1, 30], [5, 29.9, 30.1, 60],
                                                     ["lytic", "mixed", "blastic"], ["palliative", "curative"],
                                                     [False, True]):
        rec = plan(distance=d, diameter=diam, type=t, intent=intent, solitary=sol, uncertainty=0.05)
        assert rec.primary in PRIMARIES
        ablation = {"rfa_plus_cementoplasty", "cryoablation"} & {rec.primary, *rec.options}
        if d is None or d <= r.contact.contact_distance_mm:
            assert rec.primary == "refer"
        if d is not None and d < r.margin.distance_below_mm:
            assert not ablation
        if diam > r.size.diameter_above_mm:
            assert rec.primary not in ("rfa_plus_cementoplasty", "cryoablation") and "large_lesion" in rec.flags
        if ablation and d < r.heat.distance_below_mm:
            assert "thermoprotection_required" in rec.flags
        if t == "blastic":
            assert "rfa_plus_cementoplasty" not in {rec.primary, *rec.options}
        assert len(set(ids(rec))) == len(ids(rec))


# ---- borderline ----------------------------------------------------------------------------------

@pytest.mark.parametrize("distance,primary,below,above", [(0.7, "refer", "refer", "cementoplasty"),
                                                          (1.3, "cementoplasty", "refer", "cementoplasty")])
def test_borderline_at_contact_threshold(distance, primary, below, above):
    rec = plan(distance=distance, uncertainty=0.5)
    assert rec.primary == primary
    b = rec.borderline
    assert b["value"] and b["rules"] == ["R-CONTACT"]
    (alt,) = b["alternatives"]
    assert alt == alt | {"rule": "R-CONTACT", "quantity": "min_distance_to_canal_mm", "threshold": 1.0,
                         "if_below": below, "if_above": above}


@pytest.mark.parametrize("distance,primary", [(4.7, "cementoplasty"), (5.3, "rfa_plus_cementoplasty")])
def test_borderline_at_margin(distance, primary):
    rec = plan(distance=distance, intent="curative", uncertainty=0.5)
    assert rec.primary == primary
    assert rec.borderline["rules"] == ["R-MARGIN"]
    (alt,) = rec.borderline["alternatives"]
    assert (alt["if_below"], alt["if_above"], alt["threshold"]) == ("cementoplasty", "rfa_plus_cementoplasty", 5.0)


@pytest.mark.parametrize("distance", [9.7, 10.3])
@pytest.mark.parametrize("type,rule,primary", [("lytic", "R-HEAT", "rfa_plus_cementoplasty"),
                                               ("blastic", "R-COLD", "cryoablation")])
def test_borderline_at_thermal_threshold_flags_only(distance, type, rule, primary):
    rec = plan(distance=distance, type=type, intent="curative", uncertainty=0.5)
    assert rec.primary == primary
    b = rec.borderline
    assert b["value"] and b["rules"] == [rule]
    (alt,) = b["alternatives"]
    assert alt["if_below"] == alt["if_above"] == primary
    assert alt["flags_if_below"] == ["thermoprotection_required"] and alt["flags_if_above"] == []


@pytest.mark.parametrize("diameter,primary", [(29.7, "rfa_plus_cementoplasty"), (30.3, "cementoplasty")])
def test_borderline_at_size(diameter, primary):
    rec = plan(distance=20.0, diameter=diameter, intent="curative", uncertainty=0.5)
    assert rec.primary == primary
    (alt,) = rec.borderline["alternatives"]
    assert alt["rule"] == "R-SIZE" and alt["quantity"] == "max_diameter_mm"
    assert (alt["if_below"], alt["if_above"]) == ("rfa_plus_cementoplasty", "cementoplasty")


def test_several_thresholds_within_one_uncertainty():
    rec = plan(distance=3.0, intent="curative", uncertainty=2.5)  # 0.5..5.5 straddles 1 and 5
    assert rec.borderline["value"] and rec.borderline["rules"] == ["R-CONTACT", "R-MARGIN"]


def test_not_borderline_away_from_thresholds_and_clamped_at_zero(tmp_path):
    assert plan(distance=20.0, diameter=20.0, uncertainty=2.0).borderline == {
        "value": False, "rules": [], "alternatives": []}
    assert not plan(distance=0.0, uncertainty=0.5).borderline["value"]  # 0..0.5 stays in contact
    assert not plan(distance=7.0, uncertainty=0.0).borderline["value"]
    # a threshold inside the interval that changes nothing (R-HEAT for a blastic lesion) is not borderline
    site = load_rules(_write(tmp_path, lambda d: d["rules"]["R-HEAT"].update(distance_below_mm=12.0)))
    assert not plan(distance=12.2, type="blastic", uncertainty=0.5, rules=site).borderline["value"]
    assert plan(distance=12.2, type="lytic", intent="curative", uncertainty=0.5, rules=site).borderline["rules"] == [
        "R-HEAT"]


# ---- rules.yaml ----------------------------------------------------------------------------------

def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    mutate(data)
    p = tmp_path / "rules.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_override_threshold_changes_decision_and_text(tmp_path):
    p = _write(tmp_path, lambda d: d["rules"]["R-MARGIN"].update(distance_below_mm=8.0))
    site = load_rules(p)
    assert site.path == str(p) and site.sha256 != RULES.sha256
    assert plan(distance=6.5, intent="curative").primary == "rfa_plus_cementoplasty"
    rec = plan(distance=6.5, intent="curative", rules=site)
    assert rec.primary == "cementoplasty"
    assert "6.5 mm < 8 mm" in next(c for c in rec.rationale if c.rule == "R-MARGIN").text


def test_override_weight_bearing_sites_and_texts(tmp_path):
    def mutate(d):
        d["rules"]["R-CONSOLIDATE"]["weight_bearing_locations"] = ["vertebral_body", "other_bone"]
        d["rules"]["R-HEAT"]["text"]["fires"] = "local text {distance}/{threshold}"
    site = load_rules(_write(tmp_path, mutate))
    assert "R-CONSOLIDATE" in ids(plan(location="other_bone", rules=site))
    rec = plan(distance=7.0, intent="curative", rules=site)
    assert next(c for c in rec.rationale if c.rule == "R-HEAT").text == "local text 7.0/10"


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(extra_key=1), "extra_key"),
    (lambda d: d["rules"].pop("R-HEAT"), "R-HEAT"),
    (lambda d: d["rules"]["R-SIZE"].update(diameter_above_mm=-3), "R-SIZE"),
    (lambda d: d["rules"]["R-SIZE"].update(diameter_above_mm="big"), "R-SIZE"),
    (lambda d: d["rules"]["R-CONTACT"].update(treshold=2), "treshold"),
    (lambda d: d["rules"].update({"R-NEW": {}}), "R-NEW"),
    (lambda d: d["rules"]["R-COLD"]["text"].update(fires="{distanse} mm"), "distanse"),
    (lambda d: d["rules"]["R-SOLITARY"]["text"].pop("blocked"), "blocked"),
    (lambda d: d["rules"]["R-CONSOLIDATE"].update(weight_bearing_locations=["femur"]), "femur"),
    (lambda d: d["measurement"]["lesion_type"].update(mixed_fraction=0.9), "mixed_fraction"),
])
def test_bad_rules_file_is_one_clear_line(tmp_path, mutate, needle):
    p = _write(tmp_path, mutate)
    with pytest.raises(InputError) as exc:
        load_rules(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and needle in msg


def test_unreadable_rules_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_rules(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_rules(bad)
    bad.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_rules(bad)
