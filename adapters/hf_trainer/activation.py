"""What every adapter's activation does: check the framework's release and wrap its functions once.

An adapter is written against one framework release line; outside it, its overrides would silently compute
something else, so it stays off (LLaMA-Factory, ms-swift: the framework trains as it would alone, with a
warning) or refuses to import (TRL, whose users import the trainer themselves).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

WRAPPED_MARK = "__vlm_dpo_wrapped__"
logger = logging.getLogger("vlm_dpo_plugins.adapters")


@dataclass(frozen=True)
class SupportedReleases:
    framework: str
    package: str
    """The distribution name, for the ``pip install`` hint."""
    minimum: str
    below: str
    tested: str

    @property
    def range(self) -> str:
        return f">={self.minimum},<{self.below}"

    def supports(self, version: str) -> bool:
        from packaging.version import Version

        return Version(self.minimum) <= Version(Version(version).base_version) < Version(self.below)

    def require(self, version: str, importer: str, hint: str = "") -> None:
        """For an adapter its users import themselves: outside the range, importing it raises ``ImportError``."""
        if self.supports(version):
            return
        raise ImportError(
            f"{importer} supports {self.package}{self.range} (tested with {self.tested}); {self.package} {version} is "
            f"installed. Install a supported {self.framework} with: pip install '{self.package}{self.range}'. {hint}"
        )

    def stays_off(self, version: str) -> bool:
        """True, with the warning, when ``version`` is outside the range: the adapter then changes nothing."""
        if self.supports(version):
            return False
        logger.warning(
            "vlm-dpo: %s %s is outside the supported range %s; the adapter stays off and %s trains as it would "
            "without it (pip install '%s%s')",
            self.framework,
            version,
            self.range,
            self.framework,
            self.package,
            self.range,
        )
        return True


def wrap_once(
    owner: Any, name: str, make_wrapper: Callable[[Any], Any], *, unwrap: Callable[[Any], Any] = None
) -> None:
    """``owner.name = make_wrapper(owner.name)``, unless it is a wrapper already (activating twice changes nothing).

    ``unwrap``: how to get the function from what ``owner`` holds (a ``classmethod``'s ``__func__``).
    """
    held = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
    current = unwrap(held) if unwrap is not None else held
    if getattr(current, WRAPPED_MARK, False):
        return
    wrapper = make_wrapper(current)
    setattr(wrapper, WRAPPED_MARK, True)
    setattr(owner, name, classmethod(wrapper) if isinstance(held, classmethod) else wrapper)


@contextlib.contextmanager
def patched(owner: Any, **replacements: Any) -> Iterator[None]:
    """``owner``'s attributes replaced while the context is open (a framework function wrapped for one run)."""
    stock = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in stock.items():
            setattr(owner, name, value)
