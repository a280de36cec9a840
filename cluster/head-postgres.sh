#!/usr/bin/env bash
# PostgreSQL for Tiered's state store (the billing ledger) on the `ray up` head node,
# Debian/Ubuntu. Run by head_setup_commands in cluster/aws-gpu.yaml, gcp-gpu.yaml and
# local.yaml; `ray up` runs it again on every start, so each step is idempotent.
#
#   - reads TIERED_PG_PASSWORD from ~/tiered-state.env (a file mount; TIERED_STATE_ENV_FILE
#     names another), at least 16 URL-safe characters: it goes into TIERED_STATE_URL as is
#   - installs nothing when that file sets TIERED_STATE_URL (an external database)
#   - apt-get installs postgresql, makes role `tiered` (password login) owning database
#     `tiered`, listens on localhost and the head's private address (the one Ray gives
#     the workers as RAY_HEAD_IP) and admits `tiered` from the private networks
#     (TIERED_PG_ALLOW, CIDRs, overrides them) with a password (scram-sha-256) only
#
# The data is in /var/lib/postgresql on the head's disk: it outlives Ray restarts and
# `ray up` re-runs, not `ray down` where the cloud deletes the head's disk (see the
# cluster YAML for a managed database or a backup). The password is never printed.
set -euo pipefail

env_file="${TIERED_STATE_ENV_FILE:-$HOME/tiered-state.env}"
if [ ! -r "$env_file" ]; then
    echo "head-postgres: $env_file is missing; make it with" >&2
    echo "  umask 077; echo \"TIERED_PG_PASSWORD=\$(openssl rand -hex 24)\" > tiered-state.env" >&2
    exit 1
fi
chmod 600 "$env_file"
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
if [ -n "${TIERED_STATE_URL:-}" ]; then
    echo "head-postgres: $env_file sets TIERED_STATE_URL; using that database, not installing PostgreSQL"
    exit 0
fi
password="${TIERED_PG_PASSWORD:-}"
if ! [[ $password =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
    echo "head-postgres: TIERED_PG_PASSWORD in $env_file must be 16 or more of A-Z a-z 0-9 . _ ~ -" >&2
    echo "  (it is written into TIERED_STATE_URL as is), e.g. \$(openssl rand -hex 24)" >&2
    exit 1
fi
# Who may connect: the private networks by default (the cloud firewall admits only the
# cluster's nodes); TIERED_PG_ALLOW in the env file narrows or widens it (CIDRs, spaces).
allow="${TIERED_PG_ALLOW:-10.0.0.0/8 172.16.0.0/12 192.168.0.0/16}"
for cidr in $allow; do
    if ! [[ $cidr =~ ^[0-9A-Fa-f:.]+/[0-9]{1,3}$ ]]; then
        echo "head-postgres: TIERED_PG_ALLOW: $cidr is not a CIDR" >&2
        exit 1
    fi
done
cd /tmp  # psql as postgres cannot read the ssh user's home

if ! dpkg -s postgresql >/dev/null 2>&1; then
    sudo apt-get update -q -o DPkg::Lock::Timeout=600
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 postgresql
fi
conf_dir="$(ls -d /etc/postgresql/*/main | sort -V | tail -n 1)"
head_ip="$(python3 -c 'import ray.util; print(ray.util.get_node_ip_address())')"

changed=0
conf="# Written by cluster/head-postgres.sh (Tiered): every Ray node reaches the state store here.
listen_addresses = 'localhost,${head_ip}'
password_encryption = 'scram-sha-256'"
if [ "$(sudo cat "$conf_dir/conf.d/tiered.conf" 2>/dev/null || true)" != "$conf" ]; then
    printf '%s\n' "$conf" | sudo tee "$conf_dir/conf.d/tiered.conf" >/dev/null
    changed=1
fi
hba="$conf_dir/pg_hba.conf"
block="# tiered-state begin: the Ray nodes, by password (scram-sha-256) only; cluster/head-postgres.sh
$(for cidr in $allow; do printf 'host    tiered    tiered    %-18s scram-sha-256\n' "$cidr"; done)
# tiered-state end"
current="$(sudo cat "$hba")"
want="$(printf '%s\n' "$current" | sed '/^# tiered-state begin/,/^# tiered-state end/d')
$block"
if [ "$current" != "$want" ]; then
    printf '%s\n' "$want" | sudo tee "$hba" >/dev/null
    changed=1
fi

sudo systemctl enable postgresql >/dev/null 2>&1 || true
if [ "$changed" = 1 ]; then
    sudo systemctl restart postgresql
else
    sudo systemctl start postgresql
fi
for _ in $(seq 60); do
    pg_isready -q && break
    sleep 1
done
pg_isready -q || { echo "head-postgres: PostgreSQL did not start" >&2; exit 1; }

# On stdin, not in argv (ps would show it); terse errors never quote the statement.
sudo -u postgres psql -q -X -v ON_ERROR_STOP=1 -v VERBOSITY=terse -d postgres >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tiered') THEN CREATE ROLE tiered LOGIN; END IF;
END \$\$;
ALTER ROLE tiered WITH LOGIN PASSWORD '${password}';
SELECT 'CREATE DATABASE tiered OWNER tiered'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'tiered')\gexec
SQL

# The same connection the Ray nodes make: the private address, the password.
PGPASSWORD="$password" PGCONNECT_TIMEOUT=10 \
    psql -X -q -tA -h "$head_ip" -U tiered -d tiered -c 'SELECT 1' >/dev/null
echo "head-postgres: PostgreSQL ready at ${head_ip}:5432, database tiered, role tiered"
