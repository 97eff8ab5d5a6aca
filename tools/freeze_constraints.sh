#!/usr/bin/env bash
# Write constraints.txt: the exact versions the whole suite last passed with. Run it in the venv that the
# README's test command made, after the suite passed there:
#   . .venv/bin/activate && python -m pytest -q && tools/freeze_constraints.sh
# The README's set-up commands and .ci/run install with `-c constraints.txt`, so a fresh machine gets the
# tested versions instead of each dependency's newest release.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python)
{
  echo "# The exact versions the pgv25 test suite last passed with ($("$python" -c 'import platform, torch; print(f"Python {platform.python_version()}, torch {torch.__version__}")'))."
  echo "# Made by tools/freeze_constraints.sh. Used as: pip install -c constraints.txt -e \".[dev]\""
  echo "# torch is not pinned here: install the build for your machine first (the README's commands take 2.13.0)."
  "$python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+|pgv25)(==| @)' || true
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
