#!/usr/bin/env bash
# build-clamav-db.sh OUTDIR [VERSION] [DATE]: build the project's test signature database.
#
# Copies contrib/clamav/sigs/daily.{hdb,ndb,ldb} and COPYING into a scratch directory and
# runs `sigtool --build=daily.cud --unsigned --cvd-version=VERSION` there, then installs
# OUTDIR/daily.cud. clamd loads it and `VERSION` answers `ClamAV x.y.z/VERSION/<build date>`.
#
# VERSION defaults to 1. DATE (anything `date -d` understands: "3 days ago",
# "2026-11-01 10:00 UTC", "@1795430656") backdates the database: sigtool always stamps the
# current time (it has no option for it and faketime is not installed), so the script
# rewrites the build time in the two places libclamav compares -- the 512-byte CVD header
# and the first line of daily.info inside the archive -- repacks the archive and puts the
# new archive MD5 into the header. This is how the signature-age (SU-5) tests get an old
# database. Unsigned (.cud) containers carry no digital signature, so nothing else changes.
#
# Security: reads only the project's signature sources; writes only OUTDIR and a temporary
# directory that is removed on exit. No network access.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [VERSION] [DATE]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 3 ]] || usage

OUTDIR=$1
VERSION=${2:-1}
DATE=${3:-}
[[ $VERSION =~ ^[0-9]+$ ]] || { echo "$0: VERSION must be a number" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=${MAILWARDEN_SIGS:-$HERE/../contrib/clamav/sigs}
command -v sigtool >/dev/null || { echo "$0: sigtool not found (apt install clamav)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for f in COPYING daily.hdb daily.ndb daily.ldb; do
  [[ -f $SRC/$f ]] && cp "$SRC/$f" "$WORK/"
done
[[ -f $WORK/COPYING ]] || { echo "$0: $SRC/COPYING missing" >&2; exit 1; }

# sigtool asks for a builder name on stdin; --datadir points at an empty directory so
# that no installed CVD changes the version number.
mkdir "$WORK/empty"
(cd "$WORK" && echo mailwarden | sigtool --quiet --build=daily.cud --unsigned \
  --cvd-version="$VERSION" --datadir="$WORK/empty" --no-cdiff >"$WORK/sigtool.log" 2>&1) || {
  cat "$WORK/sigtool.log" >&2
  echo "$0: sigtool --build failed" >&2
  exit 1
}
[[ -f $WORK/daily.cud ]] || { cat "$WORK/sigtool.log" >&2; exit 1; }

if [[ -n $DATE ]]; then
  STIME=$(date -u -d "$DATE" +%s) || { echo "$0: cannot parse DATE '$DATE'" >&2; exit 2; }
  STAMP=$(date -u -d "@$STIME" '+%d %b %Y %H-%M %z')
  # Header fields: ClamAV-VDB:date:version:sigs:flevel:md5:dsig:builder:stime
  IFS=: read -r -a HDR < <(head -c 512 "$WORK/daily.cud" | tr -d '\0' | sed 's/ *$//') || true
  [[ ${#HDR[@]} -eq 9 && ${HDR[0]} == ClamAV-VDB ]] || { echo "$0: unexpected header" >&2; exit 1; }
  mkdir "$WORK/unpack"
  tail -c +513 "$WORK/daily.cud" | tar -xzf - -C "$WORK/unpack"
  MEMBERS=$(tail -c +513 "$WORK/daily.cud" | tar -tzf -)
  INFO=$WORK/unpack/daily.info
  IFS=: read -r -a IHDR < <(head -n1 "$INFO") || true
  IHDR[1]=$STAMP
  IHDR[8]=$STIME
  { (IFS=:; echo "${IHDR[*]}"); tail -n +2 "$INFO"; } >"$INFO.new" && mv "$INFO.new" "$INFO"
  # Same member order as sigtool (daily.info must precede the signature files).
  # shellcheck disable=SC2086
  (cd "$WORK/unpack" && tar --format=ustar --owner=0 --group=0 --numeric-owner \
     --mtime=@0 -cf - $MEMBERS) | gzip -9n >"$WORK/body.tgz"
  HDR[1]=$STAMP
  HDR[5]=$(md5sum "$WORK/body.tgz" | cut -d' ' -f1)
  HDR[8]=$STIME
  HEADER=$(IFS=:; echo "${HDR[*]}")
  { printf '%-512s' "$HEADER"; cat "$WORK/body.tgz"; } >"$WORK/daily.cud"
fi

mkdir -p "$OUTDIR"
install -m 0644 "$WORK/daily.cud" "$OUTDIR/daily.cud.tmp"
mv -f "$OUTDIR/daily.cud.tmp" "$OUTDIR/daily.cud"
sigtool --info="$OUTDIR/daily.cud" | sed -n 's/^\(Build time\|Version\|Signatures\): /  \1: /p'
