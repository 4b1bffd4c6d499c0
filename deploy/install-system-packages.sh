#!/usr/bin/env bash
# Installs the Debian packages dicomnode's tests talk to (and that a site may want beside
# the node): dcmtk (storescu, echoscu, storescp, dsrdump), Orthanc with its DICOMweb plugin
# (the PACS in the end-to-end tests), dicom3tools (dciodvfy), PostgreSQL (the multi-host
# database). Needs root. Safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools postgresql)
# Chromium: the headless browser the viewer test opens OHIF in (tests/integration/test_viewer.py).
packages+=(chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  # The packages' services are not started here: the tests start their own instances.
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "system packages present: ${packages[*]}"
