#!/bin/sh
# Print the path of a working Python X.Y interpreter (the Makefile's default PYTHON):
#
#   scripts/find_python.sh 3.12      # -> /root/.pyenv/versions/3.12.1/bin/python3.12
#
# Tries, in order: pythonX.Y on PATH (only if it really runs: a pyenv shim refuses unless
# that version is selected), pyenv's versions folder ($PYENV_ROOT or ~/.pyenv), then the
# usual system locations. Exits 1 with a message naming PYTHON= when none works.
set -u
want=${1:?usage: scripts/find_python.sh X.Y}
works() {
    [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
    "$1" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" \
        >/dev/null 2>&1
}
candidates="python$want"
root=${PYENV_ROOT:-$HOME/.pyenv}
for dir in "$root"/versions/"$want".*; do
    case $dir in *[!0-9.]) continue ;; esac  # 3.12.1, not 3.12-dev or 3.12.1/envs/x
    candidates="$candidates $dir/bin/python$want"
done
candidates="$candidates /usr/local/bin/python$want /usr/bin/python$want"
for python in $candidates; do
    if works "$python"; then
        command -v "$python"
        exit 0
    fi
done
echo "make: no working Python $want found (tried: $candidates)." >&2
echo "make: install one, or choose it: make PYTHON=/path/to/python$want ..." >&2
echo "make: with pyenv: PYENV_VERSION=$want.x, or make PYTHON=\$(pyenv root)/versions/$want.x/bin/python$want" >&2
exit 1
