#!/usr/bin/env bash
# Install Axolotl into the active python:  install-axolotl.sh VERSION CONSTRAINTS_FILE
# If the wheel's Requires-Python excludes this Python (e.g. 0.21.0 needs >=3.12),
# install its Requires-Dist (markers evaluated, extras dropped) and then the wheel
# itself with --no-deps --ignore-requires-python.
set -euo pipefail
version="${1:?usage: $0 VERSION CONSTRAINTS_FILE}"
constraints="${2:?usage: $0 VERSION CONSTRAINTS_FILE}"
pip=(python -m pip)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${pip[@]}" install -q -c "$constraints" packaging
"${pip[@]}" download -q --no-deps --ignore-requires-python -d "$tmp" "axolotl==$version"
wheel="$(ls "$tmp"/axolotl-*.whl)"

# Writes the dependency list to $tmp/requirements.txt; exit 0 = Python supported.
if python - "$wheel" "$tmp/requirements.txt" <<'PY'
import platform, sys, zipfile
from email.parser import HeaderParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
whl = zipfile.ZipFile(sys.argv[1])
meta = HeaderParser().parsestr(whl.read(next(
    n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode())
reqs = []
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        req.marker = None
        reqs.append(str(req))
open(sys.argv[2], "w").write("\n".join(reqs) + "\n")
sys.exit(platform.python_version() not in SpecifierSet(meta.get("Requires-Python") or ""))
PY
then
  "${pip[@]}" install -c "$constraints" "axolotl==$version"
else
  echo "axolotl $version: Requires-Python excludes $(python -V); installing its dependencies first" >&2
  "${pip[@]}" install -c "$constraints" -r "$tmp/requirements.txt"
  "${pip[@]}" install --no-deps --ignore-requires-python "$wheel"
fi
"${pip[@]}" check || true
