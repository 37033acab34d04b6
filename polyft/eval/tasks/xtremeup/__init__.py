"""XTREME-UP from a local release: common.yaml, one YAML per task, utils.py (loader, metrics)."""
