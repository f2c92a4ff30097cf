#!/usr/bin/env bash
# The loop's second half, run by a fleet rule (rules.toml) when a model version drifts or
# loses accuracy: export what its devices captured and labelled, build the next version on the
# original data plus that, and roll it out (shadow first, then in stages), judged against the
# devices still on the old version. Run by `toolchain listen`, it gets the trigger in
# EDGEPACK_TRIGGER_SCOPE (model@version); the rest comes from the environment:
#   EDGEPACK_STORE      the listener's store URL (sqlite:///fleet.db)
#   EDGEPACK_BROKER     the broker the rollout sends commands through (mqtt://host:1883)
#   EDGEPACK_TARGET     the hardware profile to build for (smart-speaker)
#   EDGEPACK_DATA       the original training data (digits: the built-in demo's)
#   EDGEPACK_WORK       a folder for the exported data and the new bundles (./loop)
#   EDGEPACK_MIX        the share of the training and validation splits taken from the
#                       captured data (0.8: the drift reference follows it; see README)
#   EDGEPACK_COLLECT_S  seconds to keep capturing after the alarm before exporting (0): the
#                       drifted data only starts when the drift does
#   EDGEPACK_SINCE      export only what was captured this long before the export (a
#                       duration: 2h, 30m); default: everything captured
#   EDGEPACK_BUILD_ARGS, EDGEPACK_ROLLOUT_ARGS   more flags for `toolchain build` / `rollout`
# Versions are whole numbers here: version N is followed by N+1.
set -euo pipefail

scope="${EDGEPACK_TRIGGER_SCOPE:?run me from a fleet rule (toolchain listen --rules ...)}"
model="${scope%@*}"
version="${scope##*@}"
[[ "$version" =~ ^[0-9]+$ ]] || { echo "version $version is not a whole number" >&2; exit 2; }
next=$((version + 1))
store="${EDGEPACK_STORE:-sqlite:///fleet.db}"
broker="${EDGEPACK_BROKER:-mqtt://127.0.0.1:1883}"
work="${EDGEPACK_WORK:-./loop}"
mkdir -p "$work"

# Both rules may fire for the same version: one retraining at a time, once per version.
exec 9>"$work/retrain.lock"
if ! flock -n 9; then
    echo "another retraining holds $work/retrain.lock; leaving it to that one" >&2
    exit 0
fi
if [[ -e "$work/v$next.started" ]]; then
    echo "version $next of $model was already built and rolled out from $work" >&2
    exit 0
fi
touch "$work/v$next.started"
# a failed export or build leaves no marker: the next trigger tries again
trap 'rm -f "$work/v$next.started"' ERR

if [[ "${EDGEPACK_COLLECT_S:-0}" != 0 ]]; then
    echo "[loop] $model $version: collecting for ${EDGEPACK_COLLECT_S} s more" >&2
    sleep "$EDGEPACK_COLLECT_S"
fi
echo "[loop] $model $version: exporting the labelled data its devices captured" >&2
toolchain dataset export --store "$store" --model "$model" --version "$version" \
    --labelled-only ${EDGEPACK_SINCE:+--since "$EDGEPACK_SINCE"} \
    --out "$work/captured-v$version.npz"

echo "[loop] building $model $next on ${EDGEPACK_DATA:-digits} + the captured data" >&2
rc=0
# shellcheck disable=SC2086  # the extra flags are meant to split
toolchain build --target "${EDGEPACK_TARGET:-smart-speaker}" \
    --data "${EDGEPACK_DATA:-digits}" --data "$work/captured-v$version.npz" \
    --mix "${EDGEPACK_MIX:-0.8}" --model-version "$next" \
    --out "$work/v$next" --json "$work/v$next.json" ${EDGEPACK_BUILD_ARGS:-} || rc=$?
# exit 3: a budget was missed on this build machine (the bundle is written); the rollout's
# judge measures the new version on the devices themselves, so let it decide
if [[ $rc -ne 0 && $rc -ne 3 ]]; then
    echo "[loop] the build failed (exit $rc): nothing rolled out" >&2
    rm -f "$work/v$next.started"
    exit "$rc"
fi
bundle=$(ls "$work/v$next"/*.edgepack)

trap - ERR  # from here the rollout's own state (in the store) says what happened
echo "[loop] rolling $bundle out" >&2
# shellcheck disable=SC2086
exec toolchain rollout start "$bundle" --store "$store" --broker "$broker" \
    --shadow-first ${EDGEPACK_ROLLOUT_ARGS:---stages 25,100 --soak 10m}
