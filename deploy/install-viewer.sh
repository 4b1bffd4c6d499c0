#!/usr/bin/env bash
# Installs the OHIF viewer the viewer test (tests/integration/test_viewer.py) opens studies in:
# the prebuilt web app (`dist/`) of the npm package @ohif/app, pinned, unpacked into
# <repo>/.cache/viewer/ohif-app-<version>/ (ignored by git). The test serves those files itself
# (tests/viewer/server.py) and drives the Debian `chromium` (deploy/install-system-packages.sh),
# so nothing else is needed and nothing is fetched at test time.
#
# Only the package itself is fetched (`npm pack`, which checks the registry's sha512): the dist is
# a self-contained webpack build, so the package's own npm dependencies (React, cornerstone, the
# bundler's toolchain) are not needed to serve it. Needs npm and the npm registry; no root.
# Safe to run again: an existing, complete install is kept.
set -euo pipefail
OHIF_VERSION=3.13.2
cd "$(dirname "$0")/.."
cache=.cache/viewer
target="$cache/ohif-app-$OHIF_VERSION"
if [ -f "$target/.installed" ]; then
  echo "OHIF viewer $OHIF_VERSION present: $target/dist"
  exit 0
fi
command -v npm >/dev/null || { echo "npm is not installed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d "$cache/.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
tarball=$(cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" | tail -n 1)
mkdir "$work/unpacked"
tar -xzf "$work/$tarball" -C "$work/unpacked"
# The prebuilt app must be there: the page, its configuration and the application bundle.
for f in index.html app-config.js app.bundle.css; do
  [ -f "$work/unpacked/package/dist/$f" ] || {
    echo "@ohif/app@$OHIF_VERSION has no prebuilt dist/$f" >&2
    exit 1
  }
done
compgen -G "$work/unpacked/package/dist/app.bundle.*.js" >/dev/null || {
  echo "@ohif/app@$OHIF_VERSION has no prebuilt dist/app.bundle.*.js" >&2
  exit 1
}
touch "$work/unpacked/package/.installed"
rm -rf "$target"
mv "$work/unpacked/package" "$target"
echo "OHIF viewer $OHIF_VERSION installed: $target/dist ($(du -sh "$target" | cut -f1))"
