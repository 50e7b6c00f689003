# Shared by the launch scripts (sourced): quoting, printing and running commands.

# One word, quoted for a POSIX shell only where it needs it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command exactly as it runs: one line a shell can run again.
show() {
  local line="" word
  for word in "$@"; do
    line+="$(quote "$word") "
  done
  echo "${line% }"
}

# Prints a command, then runs it unless DRY_RUN=1.
run() {
  show "$@"
  if [[ "${DRY_RUN:-0}" == 0 ]]; then
    "$@"
  fi
}

# A user error: one line naming the problem, exit 2.
die() {
  echo "error: $*; see $0 --help" >&2
  exit 2
}
