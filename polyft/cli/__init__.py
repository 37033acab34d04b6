"""The command line: `polyft COMMAND [overrides]` (polyft.cli.main), config composition
(compose.py) and the Hydra launchers (launchers.py). The only package that imports Hydra."""
