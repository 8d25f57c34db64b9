# shellcheck shell=bash
# Helpers the launchers source (not a launcher itself): print a command exactly, or run it.
#
# Every word is quoted for bash, so a printed line pasted into bash runs exactly what the launcher
# would run: an argument with spaces, quotes, `$(...)` or `;` stays one argument.

# quote_word WORD: WORD as bash reads it back: bare if it needs no quoting, in single quotes if it
# has no single quote or control character (readable, e.g. TF_CONFIG's JSON), else printf %q.
quote_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" != *"'"* && "$1" != *[[:cntrl:]]* ]]; then
    printf "'%s'" "$1"
  else
    printf '%q' "$1"
  fi
}

# quote_words WORD...: the words quoted (quote_word) and joined by single spaces.
quote_words() {
  local word separator=""
  for word in "$@"; do
    printf '%s' "$separator"
    quote_word "$word"
    separator=" "
  done
}

# command_line [NAME=VALUE ...] -- CMD [ARG...]: `NAME=VALUE ... CMD ARG...`, quoted for bash.
command_line() {
  while [[ "$1" != "--" ]]; do
    printf '%s=%s ' "${1%%=*}" "$(quote_word "${1#*=}")"
    shift
  done
  shift
  quote_words "$@"
}

# print_command [NAME=VALUE ...] -- CMD [ARG...]: one line, `cd DIR && NAME=VALUE ... CMD ARG...`.
print_command() {
  printf 'cd %s && %s\n' "$(quote_word "$PWD")" "$(command_line "$@")"
}

# run_or_print DRY_RUN [NAME=VALUE ...] -- CMD [ARG...]: with DRY_RUN=1 prints the command (see
# print_command) and exits 0; otherwise exports the variables and replaces this shell with CMD,
# so a signal sent to the launcher's pid reaches CMD itself.
run_or_print() {
  local dry_run="$1"
  shift
  if [[ "$dry_run" == 1 ]]; then
    print_command "$@"
    exit 0
  fi
  while [[ "$1" != "--" ]]; do
    export "${1%%=*}=${1#*=}"
    shift
  done
  shift
  exec "$@"
}

# usage_error SCRIPT MESSAGE: prints the message and where the usage is written, exits 2.
usage_error() {
  printf '%s: %s (usage: the comment at the top of %s)\n' "$(basename "$1")" "$2" "$1" >&2
  exit 2
}
