#!/usr/bin/env bash
# Builds the Docker image the browser tests run JupyterLab, Streamlit and Gradio from, without
# a registry: Debian bookworm by debootstrap from the mirror apt on this machine is configured
# with (read here, at run time), python3 from apt, the apps from PyPI into /opt/venv, then
# `docker import`. The tag carries a hash of this script, the pinned requirements and the app
# files, and an image with that tag is reused, so only a change to them rebuilds.
#
# Prints the image tag as the last line of stdout. Needs root (debootstrap, chroot, mount),
# debootstrap and the docker CLI. PREVIEWD_DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
app_files=(streamlit_app.py gradio_app.py)
hash="$(cd "$here" && cat build-image.sh requirements.txt "${app_files[@]}" | sha256sum | cut -c1-16)"
repo="previewd-test/apps"
tag="$repo:$hash"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

# One build at a time on this machine; a build that finished while we waited is reused.
exec 9>"${TMPDIR:-/tmp}/previewd-apps-image.lock"
flock 9
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

# The Debian mirror: the URI of the first apt source that serves a Debian release suite
# (deb822 .sources first, then one-line sources.list files).
debian_suite='^(bookworm|bullseye|trixie|forky|sid|stable|testing|unstable|oldstable)$'
mirror_from_apt() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # Stanzas are separated by blank lines; print the URI of one with a deb type and a release suite.
    awk -v re="$debian_suite" '
      function flush() { if (deb && suite && uri != "") { print uri; found = 1; exit } deb = 0; suite = 0; uri = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^[[:space:]]*#/ { next }
      tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i ~ re) suite = 1 }
      END { if (!found) flush() }
    ' "$f" | head -n1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    sed -e 's/\[[^]]*\]//' "$f" | awk -v re="$debian_suite" '$1 == "deb" && $3 ~ re { print $2; exit }'
  done
}
mirror="${PREVIEWD_DEBIAN_MIRROR:-$(mirror_from_apt | head -n1)}"
if [ -z "$mirror" ]; then
  echo "no Debian mirror found in /etc/apt (set PREVIEWD_DEBIAN_MIRROR)" >&2
  exit 1
fi

# TLS trust for pip (and apt over https) inside the chroot: the host's, which may hold a CA
# that an egress proxy signs with.
host_ca="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
[ -n "$host_ca" ] || host_ca=/etc/ssl/certs/ca-certificates.crt
index_url="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}"

work="$(mktemp -d "${TMPDIR:-/var/tmp}/previewd-apps.XXXXXX")"
root="$work/root"
cleanup() {
  umount "$root/dev/pts" "$root/proc" 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

start=$SECONDS
echo "building $tag from $mirror in $root" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
mount -t proc proc "$root/proc"
mount -t devpts devpts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
apt_opts=()
if [ -f "$host_ca" ]; then
  cp "$host_ca" "$root/tmp/host-ca.pem"
  apt_opts=(-o Acquire::https::CaInfo=/tmp/host-ca.pem)
fi
# Commands in the chroot get a clean environment (the host's CA and pip settings name host
# paths), plus the host's proxy settings, if any.
chroot_env=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!v:-}" ] && chroot_env+=("$v=${!v}")
done
in_root() { env -i "${chroot_env[@]}" chroot "$root" "$@"; }
in_root apt-get "${apt_opts[@]}" update >&2
in_root apt-get "${apt_opts[@]}" install -y --no-install-recommends python3 python3-venv >&2
in_root python3 -m venv /opt/venv >&2
cp "$here/requirements.txt" "$root/tmp/requirements.txt"
pip_opts=(--no-cache-dir --disable-pip-version-check)
[ -f "$root/tmp/host-ca.pem" ] && pip_opts+=(--cert /tmp/host-ca.pem)
[ -n "$index_url" ] && pip_opts+=(--index-url "$index_url")
in_root /opt/venv/bin/pip install "${pip_opts[@]}" -r /tmp/requirements.txt >&2
in_root useradd --create-home --uid 1000 --shell /bin/bash app
mkdir -p "$root/apps"
for f in "${app_files[@]}"; do
  install -m 0644 "$here/$f" "$root/apps/$f"
done
in_root apt-get clean
umount "$root/dev/pts" "$root/proc"
rm -rf "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/cache/debconf/*-old
: >"$root/etc/resolv.conf"

tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'USER app' \
  --change 'WORKDIR /home/app' \
  --change 'CMD ["/bin/bash"]' \
  - "$tag" >&2
# Earlier builds of this image are stale now.
docker image ls --format '{{.Repository}}:{{.Tag}}' "$repo" | grep -vxF "$tag" | xargs -r docker image rm >&2 || true
echo "built $tag in $((SECONDS - start)) s" >&2
echo "$tag"
