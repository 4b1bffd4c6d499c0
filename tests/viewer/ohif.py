"""What the OHIF page exposes, and how the viewer test reads it.

OHIF's cornerstone extension puts its state on ``window`` (its own end-to-end tests read it
there): ``window.services`` (the service manager's services: ``displaySetService``,
``measurementService``, ``viewportGridService``, ...), ``window.commandsManager``,
``window.cornerstone`` (``@cornerstonejs/core``: metadata, coordinate transforms) and
``window.cornerstoneTools`` (``@cornerstonejs/tools``: the annotation state).

When an SR display set is opened, OHIF's ``cornerstone-dicom-sr`` extension parses the
report's measurement groups and, for each group with an SCOORD on an image the study
shows, adds an annotation of its ``DICOMSRDisplay`` tool to the annotation state: its
``annotationUID`` is the group's Tracking Unique Identifier, ``metadata.referencedImageId``
the image's WADO-RS image id, ``data.renderableData.POLYLINE`` the polyline in world
coordinates. Hydration (which OHIF runs on opening a rehydratable SR when confirmation
prompts are off) then turns the groups it can map to a measurement tool into measurements
in ``measurementService`` (e.g. a closed 5-point polyline becomes a ``RectangleROI``).
Coordinates are turned back into image pixels with ``cornerstone.utilities.worldToImageCoords``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from viewer.browser import Browser, BrowserError

#: The annotation state and the measurement state, in image (pixel) coordinates.
_STATE = """(() => {
  const cs = window.cornerstone, tools = window.cornerstoneTools;
  const toImage = (imageId, points) =>
    points.map(p => Array.from(cs.utilities.worldToImageCoords(imageId, p)));
  const sopOf = imageId => (cs.metaData.get('instance', imageId) || {}).SOPInstanceUID || null;
  const annotations = tools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay')
    .map(a => {
      const imageId = a.metadata.referencedImageId;
      const polylines = ((a.data.renderableData || {}).POLYLINE || []);
      return {
        uid: a.annotationUID,
        tracking_uid: a.data.TrackingUniqueIdentifier || null,
        sop: imageId ? sopOf(imageId) : null,
        polylines: imageId ? polylines.map(pl => toImage(imageId, pl)) : [],
      };
    });
  const measurements = window.services.measurementService.getMeasurements().map(m => ({
    uid: m.uid,
    tool: m.toolName,
    sop: m.SOPInstanceUID || null,
    label: m.label || null,
    points: m.referencedImageId && m.points ? toImage(m.referencedImageId, m.points) : [],
  }));
  const shown = cs.getEnabledElements()
    .map(e => e.viewport && e.viewport.getCurrentImageId && e.viewport.getCurrentImageId())
    .filter(Boolean).map(sopOf);
  return {annotations, measurements, shown};
})()"""


def wait_until_showing(browser: Browser, sop_instance_uid: str, timeout: float) -> None:
    """Wait until OHIF is up and a viewport shows the image ``sop_instance_uid``."""
    browser.wait_for(
        f"""(() => {{
            if (!window.services || !window.cornerstone) return false;
            const shown = window.cornerstone.getEnabledElements().map(e => {{
                const v = e.viewport;
                return (v && v.getCurrentImageId && v.getCurrentImageId()) || '';
            }});
            return shown.some(id => id.includes({json.dumps("/instances/" + sop_instance_uid)}));
        }})()""",
        timeout,
        f"OHIF to show image {sop_instance_uid}",
    )


def wait_until_ready(browser: Browser, timeout: float) -> None:
    """Wait until OHIF is up and some viewport shows an image (any image)."""
    browser.wait_for(
        """(() => {
            if (!window.services || !window.cornerstone) return false;
            return window.cornerstone.getEnabledElements().some(e =>
                e.viewport && e.viewport.getCurrentImageId && !!e.viewport.getCurrentImageId());
        })()""",
        timeout,
        "OHIF to show an image",
    )


def series_thumbnail(series_description: str) -> str:
    """JavaScript for the study browser's thumbnail of the series with this description."""
    return f"""[...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')]
        .find(e => e.textContent.includes({json.dumps(series_description)}))"""


def open_series(browser: Browser, series_description: str) -> None:
    """Double-click a series in the study browser, as a reader opens it."""
    browser.click(series_thumbnail(series_description), count=2)


def wait_for_sr(
    browser: Browser, annotations: int, timeout: float, measurements: int = 1
) -> dict[str, Any]:
    """Wait until the SR shows as ``annotations`` SR annotations and at least
    ``measurements`` measurements, and hydration has finished: a viewport shows the image
    of a measurement (hydration replaces the SR's viewport and then moves to the first
    measurement's image; clicking anything before that can destroy the viewport under
    the move, which OHIF reports as an exception). Returns :func:`state` (whatever it is
    when the time is up)."""
    # On a timeout the caller's assertions say what is missing, with the state.
    with contextlib.suppress(BrowserError):
        browser.wait_for(
            f"""(() => {{
                const s = {_STATE};
                if (s.annotations.filter(a => a.sop).length < {annotations}
                    || s.measurements.length < {measurements}) return false;
                return s.measurements.length === 0
                    || s.measurements.some(m => m.sop && s.shown.includes(m.sop));
            }})()""",
            timeout,
            "the SR's annotations and measurements, and a measurement's image on screen",
        )
        settle(browser)
    return state(browser)


def state(browser: Browser) -> dict[str, Any]:
    """``{"annotations": [...], "measurements": [...], "shown": [...]}``: the SR annotations
    (``uid``, ``tracking_uid``, ``sop``, ``polylines``), the measurements (``uid``, ``tool``,
    ``sop``, ``label``, ``points``), coordinates in image pixels, and the SOP Instance UIDs
    of the images the viewports show."""
    value = browser.evaluate(_STATE)
    if isinstance(value, dict):
        return dict(value)
    return {"annotations": [], "measurements": [], "shown": []}


def open_measurements_panel(browser: Browser, timeout: float = 10) -> None:
    """Open the right-hand Measurements panel (it lists the tracked measurements)."""
    browser.click("""document.querySelector('[data-cy="trackedMeasurements-btn"]')""")
    browser.wait_for(
        """!!document.querySelector('[data-cy="trackedMeasurements-panel"]')""",
        timeout,
        "the Measurements panel",
    )


def settle(browser: Browser) -> None:
    """Let the page finish rendering: two animation frames, then a short pause."""
    browser.evaluate(
        "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => "
        "setTimeout(r, 500))))"
    )
