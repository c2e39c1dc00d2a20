"""Diagnostics: detectors fed with every logged metric, each warning once with cause and fix."""
