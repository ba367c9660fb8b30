"""The rule engine: lesion measurements + configs/rules.yaml -> per-lesion recommendations."""
