"""Checks against other libraries' implementations, each run partly in that library's own venv."""
