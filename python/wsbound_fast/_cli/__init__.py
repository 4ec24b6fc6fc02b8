"""The command line (main.py: wsbound-fast), the demo, safe readers of model and data files, plots."""
