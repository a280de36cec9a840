# Sourced before `ray start` on every `ray up` node (head and workers):
#   . ~/tiered/cluster/state-env.sh && ray start ...
# It exports TIERED_STATE_URL, the Tiered state store (the billing ledger), into the
# raylet's environment, which every Ray worker process inherits: the Serve ingress
# replicas and the admission actor may run on any node, and all of them must reach the
# same database (without it each would fall back to a SQLite file on its own disk).
#
# It reads ~/tiered-state.env (a file mount; TIERED_STATE_ENV_FILE names another):
#   TIERED_PG_PASSWORD=...   the PostgreSQL the head runs (cluster/head-postgres.sh); the URL
#                            is postgresql+psycopg://tiered:<password>@<head private IP>:5432/tiered
#   TIERED_STATE_URL='...'   an external database (RDS, Cloud SQL), used as it is
# The URL holds a secret: it is never printed, and it stays out of the Serve config
# (`tiered config render --env TIERED_STATE_URL=...` would write it there, where
# `serve config` and the dashboard show it). Returns non-zero, so `ray start` does not
# run, when neither variable is set.

_tiered_state_env="${TIERED_STATE_ENV_FILE:-$HOME/tiered-state.env}"
if [ ! -r "$_tiered_state_env" ]; then
    echo "tiered: $_tiered_state_env is missing (TIERED_PG_PASSWORD=... or TIERED_STATE_URL=...)" >&2
    unset _tiered_state_env
    return 1
fi
set -a
# shellcheck disable=SC1090
. "$_tiered_state_env"
set +a
if [ -z "${TIERED_STATE_URL:-}" ]; then
    if [ -z "${TIERED_PG_PASSWORD:-}" ]; then
        echo "tiered: $_tiered_state_env sets neither TIERED_PG_PASSWORD nor TIERED_STATE_URL" >&2
        unset _tiered_state_env
        return 1
    fi
    # Workers are given the head's address by the autoscaler (RAY_HEAD_IP); on the head
    # itself, the address Ray hands the workers (and head-postgres.sh listens on).
    _tiered_head_ip="${RAY_HEAD_IP:-$(python3 -c 'import ray.util; print(ray.util.get_node_ip_address())')}"
    if [ -z "$_tiered_head_ip" ]; then
        echo "tiered: cannot tell the head's address (RAY_HEAD_IP unset, ray not importable)" >&2
        unset _tiered_state_env _tiered_head_ip TIERED_PG_PASSWORD
        return 1
    fi
    export TIERED_STATE_URL="postgresql+psycopg://tiered:${TIERED_PG_PASSWORD}@${_tiered_head_ip}:5432/tiered"
    unset _tiered_head_ip
fi
unset TIERED_PG_PASSWORD TIERED_PG_ALLOW _tiered_state_env
