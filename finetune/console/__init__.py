"""Presentation: tables, progress bars and plots. Fed report dataclasses and files; computes nothing."""
