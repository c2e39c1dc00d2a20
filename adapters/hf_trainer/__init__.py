"""What every adapter whose framework trains with ``transformers.Trainer`` shares (TRL, LLaMA-Factory, ms-swift).

Imports transformers and accelerate only, never a framework built on them.
"""
