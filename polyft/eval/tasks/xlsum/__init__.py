"""XL-Sum with ROUGE-L: xlsum.yaml and its utilities (utils.py)."""
