"""Collation checks: catch preference pairs that can only train to a loss of ln 2."""
