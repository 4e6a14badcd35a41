"""The benchmark scripts (run as `python bench/X.py`); what they share is in bench/common.py."""
