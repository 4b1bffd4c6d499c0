"""A pipeline outcome in words: one short line per analysed image or CT series.

Made from the JSON summary a job records (``PipelineOutcome.summary``), so that the
worker's log line for a study and the status page say the same thing: the class
probabilities, the boxes and the method that made them, the CT score and decision.
No patient data is in a summary.
"""

from __future__ import annotations

from typing import Any


def describe(summary: dict[str, Any] | None) -> list[str]:
    """One line per analysed radiograph or CT series (empty when nothing was analysed)."""
    if not summary:
        return []
    if summary.get("pipeline") == "chest":
        parts = [summary.get("cxr"), summary.get("ct")]
    else:
        parts = [summary]
    lines = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("pipeline") == "cxr":
            for image in part.get("images", []):
                lines.append(_radiograph(image))
        elif part.get("pipeline") == "ct" and part.get("score") is not None:
            threshold = part.get("threshold")
            at = f"{threshold:.2f}" if isinstance(threshold, int | float) else "?"
            lines.append(
                f"CT: {part.get('finding')} {part['score']:.2f} "
                f"({'positive' if part.get('positive') else 'negative'} at threshold {at}, "
                f"{part.get('slices_classified')} slices)"
            )
    return lines


def _radiograph(image: dict[str, Any]) -> str:
    probabilities = ", ".join(
        f"{name} {value:.2f}" for name, value in image.get("probabilities", {}).items()
    )
    boxes = image.get("boxes", [])
    text = f"CXR {image.get('sop_instance_uid', '?')}: {probabilities}; {len(boxes)} box(es)"
    if boxes:
        text += f" by {image.get('box_method') or 'unknown method'}: " + " ".join(
            _box(b) for b in boxes
        )
    return text


def _box(box: dict[str, Any]) -> str:
    """``x,y widthxheight`` in source pixels, with the confidence when there is one."""
    keys = ("x", "y", "width", "height")
    if not all(isinstance(box.get(k), int | float) for k in keys):
        return "[?]"
    text = f"[{box['x']:.0f},{box['y']:.0f} {box['width']:.0f}x{box['height']:.0f}"
    if isinstance(box.get("confidence"), int | float):
        text += f" p={box['confidence']:.2f}"
    return text + "]"
