"""Freeze policy: which parts of a VLM train, with which learning rate, from which step."""
