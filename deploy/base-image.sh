#!/usr/bin/env bash
# Build a Debian base image with python3 and python3-venv locally, for machines where no container registry
# answers (so python:3.11-slim cannot be pulled): debootstrap from the machine's own apt mirror, then import
# the tree into podman. Idempotent: an existing image is reused. Needs root (debootstrap) and podman.
#   deploy/base-image.sh [IMAGE]      (default localhost/debian-base:bookworm; make base-image runs it)
# Environment: SUITE (default bookworm), APT_MIRROR (default: the first Debian archive in the apt sources),
# CONTAINERS_CONF (default: deploy/podman/containers.conf).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/podman/containers.conf}
suite=${SUITE:-bookworm}
image=${1:-localhost/debian-base:$suite}

if podman image exists "$image"; then echo "$image: already built, reused"; exit 0; fi
for tool in debootstrap podman; do
  command -v $tool >/dev/null || { echo "error: $tool is missing (apt-get install podman buildah runc debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root to build $image" >&2; exit 1; }

# The apt mirror this machine already uses for $suite itself (not -security or -updates): one-line sources
# (deb URI SUITE ...) and deb822 .sources files (URIs: / Suites:) both count.
mirror=${APT_MIRROR:-$(python3 - "$suite" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for f in ['/etc/apt/sources.list'] + sorted(glob.glob('/etc/apt/sources.list.d/*.list') + glob.glob('/etc/apt/sources.list.d/*.sources')):
    try: text = open(f).read()
    except OSError: continue
    if f.endswith('.sources'):
        for stanza in re.split(r'\n\s*\n', text):
            kv = dict((m.group(1).lower(), m.group(2).split()) for m in re.finditer(r'^([A-Za-z-]+):\s*(.*)$', stanza, re.M))
            if 'deb' in kv.get('types', []) and suite in kv.get('suites', []) and 'main' in kv.get('components', []) and kv.get('uris'):
                print(kv['uris'][0]); sys.exit()
    else:
        for line in text.splitlines():
            w = re.sub(r'\[[^]]*\]', '', line.split('#')[0]).split()
            if len(w) >= 4 and w[0] == 'deb' and w[2] == suite and 'main' in w[3:]:
                print(w[1]); sys.exit()
PY
)}
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d "${TMPDIR:-/var/tmp}/fmnist-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building $image: debootstrap $suite from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }
# what official Debian images leave out too: downloaded packages and package lists
find "$work/rootfs/var/cache/apt" "$work/rootfs/var/lib/apt/lists" -type f -delete
tar -C "$work/rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image: built ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
