"""Viewer test support: the OHIF web viewer served beside a same-origin DICOMweb proxy to
Orthanc (``server``), and headless Chromium driven over the DevTools protocol (``browser``).

The OHIF build comes from ``deploy/install-viewer.sh`` (``.cache/viewer/``); Chromium from the
Debian package. Both are only found, never fetched: without them the viewer test skips.
"""
