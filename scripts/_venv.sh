# Shared by scripts/*: create (once) and activate the project's virtualenv in .venv,
# installing citynode with its test extras. Re-installs when pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CITYNODE_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: citynode needs Python >= 3.11 ($py is $("$py" --version 2>&1))" >&2
  exit 2
fi
stamp="$venv/.citynode-installed"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "setting up $venv (first run only) ..." >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test]" >&2
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$root"
