# shellcheck shell=bash
# shellcheck disable=SC2154 # here and prog are set by the script that sources this file
# Helpers for the host-side guest scripts that take options (run-guest.sh, restart.sh). A
# script sets `here` (this directory) and `prog` (the name its messages start with) and sources
# this file; its usage text is its header comment, from line 2 to the `set -euo` line.

# shellcheck disable=SC2034 # used by the scripts that source this file
repo="$(cd "$here/../.." && pwd)"
# Where the initramfs is cached and the guests' console logs go.
# shellcheck disable=SC2034
gdir="${STRATA_GUEST_DIR:-$repo/target/guest}"

# usage: the calling script's header comment on stderr; exits 2.
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}
die() { echo "$prog: error: $*" >&2; exit 2; }
unknown_argument() { echo "$prog: unknown argument '$1'" >&2; usage; }

# require_numbers VALUE...: dies unless every VALUE is a whole number.
require_numbers() {
    local v
    for v in "$@"; do
        [[ "$v" =~ ^[0-9]+$ ]] || die "'$v' is not a number"
    done
}
