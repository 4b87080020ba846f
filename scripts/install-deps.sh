#!/usr/bin/env bash
# install-deps.sh: install the Debian packages mailwarden's tests need, only when missing.
#
# Idempotent: a second run finds every package with dpkg-query and does nothing (no network).
# Run as root (make test / make run do); uses sudo when not root and sudo is available.
# Security: runs apt-get as root. System services shipped by these packages (Postfix on
# port 25, Dovecot, clamd, clamav-milter, rspamd, Redis, PostgreSQL) are kept from starting
# during the install by a temporary policy-rc.d; the tests and benchmarks start their own
# private instances.
set -euo pipefail

PACKAGES=(
  postfix swaks dovecot-core dovecot-lmtpd clamav-daemon clamav-testfiles rspamd openssl
  redis-server postgresql slapd ldap-utils
  clamav-milter  # bench/filtered_bench.py: Postfix's ClamAV milter
  clamav  # sigtool: scripts/build-clamav-db.sh builds the project's signature database
  libnet-ssleay-perl libio-socket-ssl-perl  # swaks --tls (not pulled in without recommends)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all Debian packages present"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "install-deps: missing packages (${missing[*]}) and not root, no sudo" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

policy=/usr/sbin/policy-rc.d
backup=""
restore_policy() {
  if [[ -n "$backup" ]]; then
    "${SUDO[@]}" mv -f "$backup" "$policy"
  else
    "${SUDO[@]}" rm -f "$policy"
  fi
}
if [[ -e "$policy" ]]; then
  backup="$policy.mailwarden-save"
  "${SUDO[@]}" cp -p "$policy" "$backup"
fi
trap restore_policy EXIT
# 101 = "action forbidden by policy": invoke-rc.d will not start any service.
printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
"${SUDO[@]}" chmod 755 "$policy"

echo "postfix postfix/main_mailer_type select No configuration" \
  | "${SUDO[@]}" debconf-set-selections
echo "postfix postfix/mailname string localhost" | "${SUDO[@]}" debconf-set-selections

"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends -o Dpkg::Options::=--force-confdef \
  -o Dpkg::Options::=--force-confold "${missing[@]}"
echo "install-deps: done"
