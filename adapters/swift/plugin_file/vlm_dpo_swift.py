"""vlm-dpo-plugins for ms-swift: pass this file to ``swift rlhf --external_plugins``.

Swift executes it under a generated module name, on every rank, while it parses its arguments.
It only calls into the installed package, so executing it twice (or importing it as well)
activates once. This folder holds nothing else because swift puts it first on ``sys.path``.
"""

from vlm_dpo_plugins.adapters.swift.activation import activate

activate()
