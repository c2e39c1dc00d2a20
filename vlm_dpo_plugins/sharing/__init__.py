"""Prompt and image sharing: each preference pair packed into one row, its images encoded once per step."""
