"""The rule engine: lesion features + the rule table (configs/rules.yaml) -> one recommendation.

``plan_lesion`` follows the "Default decision, in order" section of CLINICAL_RULES.md literally
(the order is also written at the top of configs/rules.yaml), then adds the flags and rationale
lines of every other rule whose condition holds. No clinical number is written here: thresholds,
flags, sentences and sources come from the ``Rules`` object.

Borderline: a distance or diameter is known to about ``lesion.distance_uncertainty_mm``. The
decision is re-evaluated at value - u (clamped at 0) and value + u for each thresholded quantity;
where a threshold inside that interval changes the primary, the options or the flags, the
recommendation is marked borderline and each such threshold is listed with the primary on either
side of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from pipeline.errors import InputError
from pipeline.plan.rules import Rules, load_rules
from pipeline.types import Lesion, Recommendation, RuleCitation

__all__ = ["load_rules", "plan_study", "plan_lesion", "INTENTS", "PRIMARIES", "Rules"]

INTENTS = ("palliative", "curative")
PRIMARIES = ("cementoplasty", "rfa_plus_cementoplasty", "rfa", "cryoablation",
             "cryoablation_plus_cementoplasty", "refer")
ABLATIONS = frozenset({"rfa", "rfa_plus_cementoplasty", "cryoablation", "cryoablation_plus_cementoplasty"})

DISTANCE = "min_distance_to_canal_mm"
DIAMETER = "max_diameter_mm"

# Half-width of the probe around a threshold when asking "which way would each side go".
_PROBE_MM = 1e-6


@dataclass(frozen=True)
class _Facts:
    """What a decision depends on (one lesion, one intent)."""

    distance: float | None
    diameter: float
    type: str
    location: str
    solitary: bool
    intent: str
    features: dict[str, Any]


@dataclass
class _Decision:
    primary: str = ""
    options: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    citations: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (rule id, text key, ctx)

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def option(self, name: str) -> None:
        if name not in self.options:
            self.options.append(name)

    def cite(self, rule_id: str, key: str = "fires", **extra: str) -> None:
        self.citations.append((rule_id, key, extra))

    @property
    def rule_ids(self) -> frozenset[str]:
        return frozenset(c[0] for c in self.citations)

    @property
    def signature(self) -> tuple[str, tuple[str, ...], frozenset[str]]:
        return self.primary, tuple(self.options), frozenset(self.flags)


def plan_study(lesions: list[Lesion], rules: Rules, intent: str) -> list[Recommendation]:
    """One recommendation per lesion, in the same order. ``solitary`` = exactly one lesion."""
    _check_intent(intent)
    solitary = len(lesions) == 1
    return [plan_lesion(lesion, rules, intent, solitary) for lesion in lesions]


def plan_lesion(lesion: Lesion, rules: Rules, intent: str, solitary: bool) -> Recommendation:
    """The recommendation for one lesion (see the module docstring and configs/rules.yaml)."""
    _check_intent(intent)
    if lesion.type not in ("lytic", "mixed", "blastic"):
        raise ValueError(f"lesion {lesion.id}: unknown type {lesion.type!r}")
    facts = _Facts(
        distance=None if lesion.min_distance_to_canal_mm is None else float(lesion.min_distance_to_canal_mm),
        diameter=float(lesion.max_diameter_mm),
        type=lesion.type,
        location=lesion.location,
        solitary=bool(solitary),
        intent=intent,
        features=dict(lesion.features or {}),
    )
    if lesion.bone_reference_hu is not None and "bone_reference_hu" not in facts.features:
        facts.features["bone_reference_hu"] = lesion.bone_reference_hu
    decision = _decide(facts, rules)
    return Recommendation(
        primary=decision.primary,
        options=list(decision.options),
        flags=list(decision.flags),
        rationale=_citations(decision, facts, rules),
        borderline=_borderline(facts, rules, decision, float(lesion.distance_uncertainty_mm)),
    )


def _check_intent(intent: str) -> None:
    if intent not in INTENTS:
        raise InputError(f"unknown intent {intent!r} (expected one of {', '.join(INTENTS)})")


def _decide(f: _Facts, rules: Rules) -> _Decision:
    """The default decision, in order (CLINICAL_RULES.md), then the descriptive rules."""
    r = rules.rules
    dec = _Decision()
    d, diam = f.distance, f.diameter
    curative = f.solitary or f.intent == "curative"
    large = diam > r.size.diameter_above_mm
    near_margin = d is not None and d < r.margin.distance_below_mm
    lytic_like = f.type in ("lytic", "mixed")
    blockers: list[str] = []

    if d is None:
        dec.primary = "refer"
        dec.flag(r.no_canal.flag)
        dec.cite("R-NO-CANAL")
        if lytic_like:
            dec.option("cementoplasty")
        blockers.append("R-NO-CANAL")
    elif d <= r.contact.contact_distance_mm:
        dec.primary = "refer"
        dec.option("cementoplasty")
        dec.flag(r.contact.flag)
        dec.flag(r.contact.option_flag)
        dec.cite("R-CONTACT")
        blockers.append("R-CONTACT")
    elif f.type == "blastic":
        ablate = not near_margin and not large
        dec.primary = "cryoablation" if ablate else "refer"
        if not ablate and not near_margin:
            dec.option("cryoablation")  # palliative: refused only for size
        if d < r.cold.distance_below_mm and "cryoablation" in (dec.primary, *dec.options):
            dec.flag(r.cold.flag)
            dec.cite("R-COLD")
    else:
        ablate = curative and not near_margin and not large
        if ablate:
            dec.primary = "rfa_plus_cementoplasty"
            dec.cite("R-LYTIC-RFA", "primary")
        else:
            dec.primary = "cementoplasty"
            if not near_margin:
                dec.option("rfa_plus_cementoplasty")
                dec.cite("R-LYTIC-RFA", "option")
        if d < r.heat.distance_below_mm and "rfa_plus_cementoplasty" in (dec.primary, *dec.options):
            dec.flag(r.heat.flag)
            dec.cite("R-HEAT")

    if f.type == "blastic":
        dec.cite("R-BLASTIC")
    if near_margin:
        dec.cite("R-MARGIN")
        blockers.append("R-MARGIN")
    if large:
        dec.flag(r.size.flag)
        dec.cite("R-SIZE")
        blockers.append("R-SIZE")
    if lytic_like and f.location in r.consolidate.weight_bearing_locations:
        dec.cite("R-CONSOLIDATE")
    if curative:
        aim = " and ".join(x for x, on in (("solitary lesion", f.solitary),
                                          ("curative intent", f.intent == "curative")) if on)
        if dec.primary in ABLATIONS:
            dec.cite("R-SOLITARY", "allowed", aim=aim)
        else:
            dec.cite("R-SOLITARY", "blocked", aim=aim, reason=" and ".join(dict.fromkeys(blockers)) or "the rule table")
    return dec


_ORDER = ("R-NO-CANAL", "R-CONTACT", "R-BLASTIC", "R-LYTIC-RFA", "R-MARGIN", "R-SIZE", "R-SOLITARY",
          "R-CONSOLIDATE", "R-HEAT", "R-COLD")


def _citations(dec: _Decision, f: _Facts, rules: Rules) -> list[RuleCitation]:
    """One sentence per rule that fired, specific to this lesion, in a fixed reading order."""
    out = []
    ordered = sorted(dec.citations, key=lambda c: _ORDER.index(c[0]) if c[0] in _ORDER else len(_ORDER))
    for rule_id, key, extra in ordered:
        spec = rules.rules.by_id(rule_id)
        ctx = _context(f, rules, rule_id)
        ctx.update(extra)
        out.append(RuleCitation(rule=rule_id, text=spec.text[key].format(**ctx), source=spec.source))
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _threshold(rules: Rules, rule_id: str) -> str:
    spec = rules.rules.by_id(rule_id)
    for name in ("contact_distance_mm", "distance_below_mm", "diameter_above_mm"):
        if hasattr(spec, name):
            return f"{getattr(spec, name):g}"
    return "n/a"


def _context(f: _Facts, rules: Rules, rule_id: str) -> dict[str, str]:
    feats = f.features
    params = rules.measurement.lesion_type

    def pct(key: str) -> str:
        v = feats.get(key)
        return "n/a" if v is None else f"{100.0 * float(v):.0f}"

    return {
        "distance": _fmt(f.distance),
        "diameter": _fmt(f.diameter),
        "threshold": _threshold(rules, rule_id),
        "type": f.type,
        "location": f.location.replace("_", " "),
        "aim": "",
        "reason": "",
        "bone_reference_hu": _fmt(feats.get("bone_reference_hu"), 0),
        "lytic_fraction": pct("lytic_fraction"),
        "blastic_fraction": pct("blastic_fraction"),
        "lytic_delta_hu": f"{params.lytic_delta_hu:g}",
        "blastic_delta_hu": f"{params.blastic_delta_hu:g}",
    }


def _thresholds(rules: Rules) -> dict[str, list[tuple[float, str]]]:
    """Thresholded quantities -> [(threshold, rule id)]."""
    r = rules.rules
    return {
        DISTANCE: [(r.contact.contact_distance_mm, "R-CONTACT"), (r.margin.distance_below_mm, "R-MARGIN"),
                   (r.heat.distance_below_mm, "R-HEAT"), (r.cold.distance_below_mm, "R-COLD")],
        DIAMETER: [(r.size.diameter_above_mm, "R-SIZE")],
    }


def _borderline(f: _Facts, rules: Rules, nominal: _Decision, u: float) -> dict[str, Any]:
    none: dict[str, Any] = {"value": False, "rules": [], "alternatives": []}
    if not (u > 0 and math.isfinite(u)):
        return none
    setters: dict[str, tuple[float | None, Callable[[float], _Facts]]] = {
        DISTANCE: (f.distance, lambda v: replace(f, distance=v)),
        DIAMETER: (f.diameter, lambda v: replace(f, diameter=v)),
    }
    rule_ids: list[str] = []
    alternatives: list[dict[str, Any]] = []
    for quantity, pairs in _thresholds(rules).items():
        value, at = setters[quantity]
        if value is None:
            continue
        lo, hi = max(0.0, value - u), value + u
        if all(_decide(at(v), rules).signature == nominal.signature for v in (lo, hi)):
            continue
        for t in sorted({t for t, _ in pairs}):
            if not lo <= t <= hi:
                continue
            below = _decide(at(max(0.0, t - _PROBE_MM)), rules)
            above = _decide(at(t + _PROBE_MM), rules)
            if below.signature == above.signature:
                continue
            at_t = [rid for tt, rid in pairs if tt == t]
            ids = [rid for rid in at_t if rid in below.rule_ids ^ above.rule_ids] or at_t
            for rid in ids:
                alternatives.append({
                    "rule": rid, "quantity": quantity, "threshold": t,
                    "if_below": below.primary, "if_above": above.primary,
                    "options_if_below": list(below.options), "options_if_above": list(above.options),
                    "flags_if_below": list(below.flags), "flags_if_above": list(above.flags),
                })
                if rid not in rule_ids:
                    rule_ids.append(rid)
    if not alternatives:
        return none
    return {"value": True, "rules": rule_ids, "alternatives": alternatives}
