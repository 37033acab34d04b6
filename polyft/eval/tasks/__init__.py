"""Task YAMLs polyft ships for lm-eval (a package so that task utilities ship in the wheel)."""
