"""compactnlu: the library behind the study's notebooks (README, "Layout")."""
