# sbx guest agent: persistent bash REPL wrapper.
#
# Requests arrive on fd 3: a header line "<id> <len pre> <len code> <len post>" and then
# the three byte strings. "pre" and "post" set and restore the exec's environment; the
# code is eval'd in this shell (state persists) with stdin at EOF and fds 3/4 closed.
# Completion is reported only on fd 4 as "<id> <exit code>", and only by this process.
__sbx_pid=$BASHPID
__sbx_inloop=0
__sbx_readn() {
  if (( $1 == 0 )); then
    __sbx_buf=
  elif (( $1 <= 65536 )); then
    LC_ALL=C IFS= builtin read -r -d '' -N "$1" -u 3 __sbx_buf || exit 0
  else
    __sbx_buf=$(command head -c "$1" <&3; builtin printf x) || exit 0
    __sbx_buf=${__sbx_buf%x}
  fi
}
__sbx_next() {
  IFS=' ' builtin read -r -u 3 __sbx_nonce __sbx_l1 __sbx_l2 __sbx_l3 || exit 0
  __sbx_readn "$__sbx_l1"; __sbx_pre=$__sbx_buf
  __sbx_readn "$__sbx_l2"; __sbx_code=$__sbx_buf
  __sbx_readn "$__sbx_l3"; __sbx_post=$__sbx_buf
  __sbx_buf=
}
__sbx_finish() {
  [[ $BASHPID == "$__sbx_pid" ]] || exit "$1"
  builtin eval "$__sbx_post"
  builtin printf '%s %d\n' "$__sbx_nonce" "$1" >&4 || exit "$1"
}
while :; do
  while :; do
    if (( __sbx_inloop )); then __sbx_inloop=0; __sbx_finish 0; fi
    __sbx_next
    builtin eval "$__sbx_pre"
    __sbx_inloop=1
    builtin eval "$__sbx_code" </dev/null 3<&- 4<&-
    __sbx_rc=$?
    __sbx_inloop=0
    __sbx_finish "$__sbx_rc"
  done
  if (( __sbx_inloop )); then __sbx_inloop=0; __sbx_finish 0; fi
done
