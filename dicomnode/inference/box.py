"""A box in image pixels (no OpenCV, no model): imported by the stage types, so that a
receiving process that loads the pipeline registry does not load OpenCV."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of some image; ``confidence`` when it is a finding."""

    x: float
    y: float
    width: float
    height: float
    confidence: float | None = None

    def scaled(self, sx: float, sy: float) -> Box:
        """The same box in an image ``sx`` times wider and ``sy`` times taller."""
        return Box(self.x * sx, self.y * sy, self.width * sx, self.height * sy, self.confidence)

    def shifted(self, dx: float, dy: float) -> Box:
        """The same box moved by (dx, dy)."""
        return Box(self.x + dx, self.y + dy, self.width, self.height, self.confidence)

    def within(self, width: float, height: float) -> bool:
        """Whether the box lies inside an image of that size."""
        return (
            self.x >= 0
            and self.y >= 0
            and self.x + self.width <= width + 1e-6
            and self.y + self.height <= height + 1e-6
        )
