# shellcheck shell=bash
# Sent by tests/bench.py as USER_RUN (bash -c).
# shellcheck source=/dev/null # the user bundle hub add-user wrote
set -a; . /root/gridx-benchuser-user/settings.env; set +a
t "$1" gridx jobs run --wait --name "$2" python:3.11 true
