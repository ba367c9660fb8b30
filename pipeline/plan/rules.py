"""The rule table (configs/rules.yaml) as validated pydantic models.

Every clinical number, rule id, rule text and source lives in the YAML file; this module only
says which keys exist and checks them (unknown keys, missing rules, a template with an unknown
placeholder -> ``InputError`` with one line). ``load_rules`` is re-exported by
``pipeline.plan.engine``.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.config import CONFIG_DIR, read_yaml
from pipeline.errors import InputError

DEFAULT_RULES_PATH = CONFIG_DIR / "rules.yaml"

# Names a rationale template may use (filled by pipeline/plan/engine.py for each lesion).
TEMPLATE_FIELDS: frozenset[str] = frozenset({
    "distance", "diameter", "threshold", "type", "location", "aim", "reason",
    "bone_reference_hu", "lytic_fraction", "blastic_fraction", "lytic_delta_hu", "blastic_delta_hu",
})

LOCATIONS: frozenset[str] = frozenset({"vertebral_body", "posterior_elements", "other_bone", "unknown"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleSpec(_Strict):
    """What every rule has: a title (the general statement), a source and sentence templates."""

    REQUIRED_TEXTS: ClassVar[tuple[str, ...]] = ("fires",)

    title: str = Field(min_length=1)
    source: str = Field(min_length=1)
    text: dict[str, str]

    @model_validator(mode="after")
    def _check_texts(self) -> "RuleSpec":
        missing = [k for k in self.REQUIRED_TEXTS if k not in self.text]
        extra = [k for k in self.text if k not in self.REQUIRED_TEXTS]
        if missing:
            raise ValueError(f"text is missing {missing}")
        if extra:
            raise ValueError(f"text has unknown entries {extra} (expected {list(self.REQUIRED_TEXTS)})")
        for key, template in self.text.items():
            for _, name, _, _ in string.Formatter().parse(template):
                if name is not None and name not in TEMPLATE_FIELDS:
                    raise ValueError(f"text.{key} uses unknown placeholder {{{name}}}")
        return self


class ContactRule(RuleSpec):
    contact_distance_mm: float = Field(ge=0.0)
    flag: str = Field(min_length=1)
    option_flag: str = Field(min_length=1)


class DistanceBelowRule(RuleSpec):
    distance_below_mm: float = Field(gt=0.0)


class ThermalRule(DistanceBelowRule):
    flag: str = Field(min_length=1)


class SizeRule(RuleSpec):
    diameter_above_mm: float = Field(gt=0.0)
    flag: str = Field(min_length=1)


class LyticRfaRule(RuleSpec):
    REQUIRED_TEXTS: ClassVar[tuple[str, ...]] = ("primary", "option")


class ConsolidateRule(RuleSpec):
    weight_bearing_locations: list[str]

    @model_validator(mode="after")
    def _check_locations(self) -> "ConsolidateRule":
        bad = [x for x in self.weight_bearing_locations if x not in LOCATIONS]
        if bad:
            raise ValueError(f"unknown locations {bad} (known: {sorted(LOCATIONS)})")
        return self


class SolitaryRule(RuleSpec):
    REQUIRED_TEXTS: ClassVar[tuple[str, ...]] = ("allowed", "blocked")


class NoCanalRule(RuleSpec):
    flag: str = Field(min_length=1)


class RuleSet(_Strict):
    """The rule ids are stable (reports cite them); all are required."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    contact: ContactRule = Field(alias="R-CONTACT")
    heat: ThermalRule = Field(alias="R-HEAT")
    cold: ThermalRule = Field(alias="R-COLD")
    margin: DistanceBelowRule = Field(alias="R-MARGIN")
    size: SizeRule = Field(alias="R-SIZE")
    blastic: RuleSpec = Field(alias="R-BLASTIC")
    lytic_rfa: LyticRfaRule = Field(alias="R-LYTIC-RFA")
    consolidate: ConsolidateRule = Field(alias="R-CONSOLIDATE")
    solitary: SolitaryRule = Field(alias="R-SOLITARY")
    no_canal: NoCanalRule = Field(alias="R-NO-CANAL")

    def by_id(self, rule_id: str) -> RuleSpec:
        for name, info in type(self).model_fields.items():
            if info.alias == rule_id:
                return getattr(self, name)
        raise KeyError(rule_id)

    @property
    def ids(self) -> list[str]:
        return [info.alias for info in type(self).model_fields.values() if info.alias]


class LesionTypeParams(_Strict):
    lytic_delta_hu: float = Field(ge=0.0)
    blastic_delta_hu: float = Field(ge=0.0)
    mixed_fraction: float = Field(gt=0.0, le=0.5)
    min_reference_voxels: int = Field(ge=1)
    default_bone_reference_hu: float


class LocationParams(_Strict):
    other_bone_distance_mm: float = Field(gt=0.0)
    canal_neighbourhood_mm: float = Field(gt=0.0)


class CanalParams(_Strict):
    min_component_fraction: float = Field(ge=0.0, le=1.0)


class MeasurementParams(_Strict):
    lesion_type: LesionTypeParams
    location: LocationParams
    canal: CanalParams


class Rules(_Strict):
    """The whole rule file. ``path`` and ``sha256`` say which file it came from (for reports)."""

    version: str = Field(min_length=1)
    rules: RuleSet
    measurement: MeasurementParams

    _path: str = PrivateAttr(default="")
    _sha256: str = PrivateAttr(default="")

    @property
    def path(self) -> str:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256


def load_rules(path: Path | None = None) -> Rules:
    """Read and validate a rules file (default ``configs/rules.yaml``).

    Raises ``InputError`` with one line naming the file and the first problem.
    """
    path = Path(path) if path is not None else DEFAULT_RULES_PATH
    data = read_yaml(path)
    try:
        rules = Rules.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(f"invalid rules file {path}: {where}: {msg}{more}") from None
    rules._path = str(path)
    rules._sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return rules
