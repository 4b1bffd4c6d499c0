"""The retry schedule shared by jobs and deliveries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

#: Longest error text kept per job or delivery (the full traceback goes to the log).
ERROR_LIMIT = 2000


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base``, ``2 * base``, ``4 * base`` ... capped at ``maximum``."""

    base_s: float
    maximum_s: float

    def delay(self, attempts: int) -> timedelta:
        """The wait before attempt ``attempts + 1``."""
        return timedelta(seconds=min(self.maximum_s, self.base_s * 2 ** max(0, attempts - 1)))
