# Output directory of an example script: never delete what the script did not create.
# Sourced by examples/quickstart.sh (bash):
#
#   source "$ROOT/examples/out_dir_guard.sh"
#   out_dir_parse_args "runs/quickstart" "$@"   # sets OUT (absolute) and FORCE from --out DIR / OUT= / --force
#   out_dir_claim "$OUT" "$FORCE"                # creates or empties OUT, or refuses (exit 2) and leaves it as it is
#
# A directory the script creates (or finds empty) gets a marker file; a later run empties a directory
# that carries the marker and refuses any other non-empty directory unless --force is given. Paths
# whose loss would be a disaster (/, $HOME, the repository and its ancestors) are refused even with --force.

OUT_DIR_MARKER=".megatron_ral_example_output"

out_dir_usage() {
  cat <<EOF
usage: bash ${0##*/} [--out DIR] [--force]

  --out DIR   output directory (default: \$OUT, else $1 in the repository); relative to the current directory
  --force     use a non-empty DIR that this script did not create, deleting what is in it
EOF
  if [[ -n "${OUT_DIR_EXTRA_USAGE:-}" ]]; then echo "$OUT_DIR_EXTRA_USAGE"; fi  # the script's own options
}

out_dir_fail() {
  echo "${0##*/}: error: $*" >&2
  exit 2
}

# out_dir_parse_args DEFAULT_RELATIVE_TO_REPO "$@": sets OUT (absolute) and FORCE (0/1).
out_dir_parse_args() {
  local default="$1"; shift
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  FORCE=0
  local out="${OUT:-}"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --out) [[ $# -ge 2 && -n "$2" ]] || out_dir_fail "--out needs a directory"; out="$2"; shift 2 ;;
      --out=*) out="${1#--out=}"; [[ -n "$out" ]] || out_dir_fail "--out needs a directory"; shift ;;
      --force) FORCE=1; shift ;;
      -h|--help) out_dir_usage "$default"; exit 0 ;;
      *) out_dir_fail "unknown argument: $1 (see --help)" ;;
    esac
  done
  if [[ -z "$out" ]]; then
    out="$repo/$default"
  fi
  OUT="$(realpath -m -- "$out")"
}

# out_dir_claim DIR FORCE: afterwards DIR exists, is empty except for the marker, and is ours.
out_dir_claim() {
  local dir="$1" force="$2"
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  case "$repo/" in
    "$dir"/*) out_dir_fail "--out $dir: is the repository or one of its parent directories; choose a directory of its own" ;;
  esac
  if [[ "$dir" == "/" || "$dir" == "$(realpath -m -- "${HOME:-/}")" ]]; then
    out_dir_fail "--out $dir: refusing to use / or the home directory; choose a directory of its own"
  fi
  if [[ -e "$dir" && ! -d "$dir" ]]; then
    out_dir_fail "--out $dir: exists and is not a directory"
  fi
  if [[ -d "$dir" && -n "$(ls -A -- "$dir")" ]]; then
    if [[ ! -f "$dir/$OUT_DIR_MARKER" && "$force" != 1 ]]; then
      out_dir_fail "--out $dir: exists, is not empty and was not created by this script; nothing was changed (choose another directory, or --force to delete its contents)"
    fi
    # Ours (marker) or released by --force: empty it, the directory itself stays.
    find "$dir" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
  fi
  mkdir -p -- "$dir" 2>/dev/null || out_dir_fail "--out $dir: cannot create the directory"
  echo "created by ${0##*/} of megatron_ral; the script empties this directory when it runs again" > "$dir/$OUT_DIR_MARKER"
}
