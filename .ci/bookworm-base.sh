#!/usr/bin/env bash
# bookworm-base.sh IMAGE [MIRROR]: a minbase Debian bookworm from Debian's mirror, imported into
# containers-storage as IMAGE, for `make image` where Docker Hub cannot be reached. It is set up the way
# Debian's official slim images are (apt keeps no .debs or package lists; no docs, man pages or locales),
# with bookworm-updates and bookworm-security enabled and applied. Needs root, debootstrap and podman.
set -euo pipefail
image=$1
mirror=${2:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/bookworm-base.XXXXXX)
log=$root.log
trap 'rm -rf "$root" "$log"' EXIT
fail() { tail -30 "$log" >&2; echo "bookworm-base: $1 failed (log above)" >&2; exit 1; }

echo "debootstrap bookworm (minbase) from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1 || fail debootstrap

cat >"$root/etc/apt/sources.list" <<LIST
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
LIST
# As debuerreotype (Debian's official images) configures apt and dpkg:
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
CONF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{info,locale,man,groff,linda,lintian}/*

chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade' \
  >>"$log" 2>&1 || fail "apt-get upgrade"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
rm -f "$root"/var/log/*.log "$root"/var/log/apt/*
: >"$root/etc/resolv.conf"  # podman and Kubernetes mount their own

tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "imported $image ($(du -sh "$root" | cut -f1) rootfs)"
