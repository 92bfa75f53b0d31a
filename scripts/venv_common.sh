# Sourced by scripts/setup_*.sh: making an environment folder without ever deleting one this project did not make.
# MEDSAM3_VENV (and the other scripts' variables) may name any folder, a user's own venv or a folder of their work.

# new_venv VENV PYTHON TAG: (re)create VENV with PYTHON. An existing folder is removed only when one of these scripts
# made it (its marker, or the dependency stamp of an older build) or it is empty; otherwise the script stops. A
# user's own environment the scripts installed into (.medsam3-adopted) is never removed.
new_venv() {
  local venv="$1" python="$2" tag="$3"
  if [ -e "$venv" ] && { [ -f "$venv/.medsam3-adopted" ] || { [ ! -f "$venv/.medsam3-venv" ] \
     && [ ! -f "$venv/.medsam3-deps" ] && [ ! -f "$venv/.medsam3-monailabel-deps" ] \
     && [ -n "$(ls -A "$venv" 2>/dev/null || echo unreadable)" ]; }; }; then
    echo "[$tag] $venv exists but is not an environment these scripts made (no .medsam3-venv inside), and it" \
         "does not work as one: not deleting it. Remove it yourself, or point the variable elsewhere." >&2
    exit 1
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  touch "$venv/.medsam3-venv"
}

# require_python PYTHON TAG: PYTHON exists and is 3.11 or newer.
require_python() {
  local python="$1" tag="$2"
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "[$tag] $python not found: medsam3-monai needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)'; then
    echo "[$tag] $python is $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'): medsam3-monai" \
         "needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
}
