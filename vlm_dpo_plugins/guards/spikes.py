"""Loss-spike detection against the running median of recent losses.

A median, not a mean, because one spike must not raise the bar for the next one;
and a full window before judging, because the first DPO steps move fast.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any


class LossSpikeDetector:
    """Flags a loss above ``factor`` × the median of the last ``window`` finite losses."""

    def __init__(self, window: int, factor: float | None) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)
        self.spikes = 0

    @property
    def median(self) -> float | None:
        return statistics.median(self.recent) if self.recent else None

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` would be a spike now, without recording it; non-finite losses are the skip guard's."""
        return (
            math.isfinite(loss)
            and self.factor is not None
            and len(self.recent) == self.recent.maxlen
            and (median := statistics.median(self.recent)) > 0
            and loss > self.factor * median
        )

    def observe(self, loss: float) -> bool:
        """Record ``loss`` and say whether it is a spike."""
        if not math.isfinite(loss):
            return False
        spike = self.is_spike(loss)
        self.recent.append(loss)
        self.spikes += spike
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(float(loss) for loss in state["recent"])
        self.spikes = int(state["spikes"])
