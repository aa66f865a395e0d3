"""Data files: the demo scene generator (scenes/make_demo.py), icons and style sheets."""
