#!/bin/sh
# One-shot setup for deploy/compose.yaml (a trial of two Tresor nodes, not production): a
# SoftHSM2 token, a development CA with server and client certificates, the access policy,
# connection profiles and one configuration per node. Idempotent: does nothing if the
# configuration exists. Uses openssl and softhsm2-util (installed by the setup service); the
# Tresor service itself links neither.
#   CONFIG_DIR  where configuration, certificates and secrets go (default /etc/tresor)
#   TOKEN_DIR   SoftHSM2 token directory shared by the nodes (default /var/lib/softhsm/tokens)
#   DB_URL      the nodes' database.url (default postgres://tresor@postgres/tresor)
#   OWNER       uid:gid that runs Tresor (default 10001:10001, the image's user)
set -eu
CONFIG_DIR=${CONFIG_DIR:-/etc/tresor}
TOKEN_DIR=${TOKEN_DIR:-/var/lib/softhsm/tokens}
DB_URL=${DB_URL:-postgres://tresor@postgres/tresor}
OWNER=${OWNER:-10001:10001}
PG_OWNER=${PG_OWNER:-999:999}

if [ -e "$CONFIG_DIR/node-a.toml" ]; then
  echo "compose-setup: $CONFIG_DIR is already set up"
  exit 0
fi
mkdir -p "$CONFIG_DIR" "$TOKEN_DIR"
cd "$CONFIG_DIR"
umask 077

random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# The token, shared by both nodes (SoftHSM2 supports several processes on one token).
cat >softhsm2.conf <<EOF
directories.tokendir = $TOKEN_DIR
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
chmod 644 softhsm2.conf
pin=$(random 16)
SOFTHSM2_CONF=$CONFIG_DIR/softhsm2.conf softhsm2-util --init-token --free --label tresor \
  --so-pin "$(random 16)" --pin "$pin" >/dev/null
printf %s "$pin" >pin

# The database password: for the nodes as a .pgpass line, for PostgreSQL's first start as a file.
db_password=$(random 24)
printf '*:*:*:tresor:%s\n' "$db_password" >pgpass
printf %s "$db_password" >pgpassword

# A development CA, a server certificate for both nodes and client certificates (P-256).
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=Tresor trial CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -out ca.pem
issue() { # name, subject CN, extensions
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 90 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server node "subjectAltName=DNS:localhost,DNS:node-a,DNS:node-b,IP:127.0.0.1
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
for who in officer officer2 service auditor; do
  issue "$who" "$who" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
done
rm -f ca.srl

cat >policy.toml <<'EOF'
# Trial policy: tenant "demo"; two officers so that four-eyes destruction can be tried.
[[identity]]
name = "officer"
tenant = "demo"
roles = ["officer"]

[[identity]]
name = "officer2"
tenant = "demo"
roles = ["officer"]

[[identity]]
name = "service"
tenant = "demo"
roles = ["service"]

[[identity]]
name = "auditor"
tenant = "demo"
roles = ["auditor"]
EOF

for node in node-a node-b; do
  cat >"$node.toml" <<EOF
[server]
listen = "0.0.0.0:8443"
node_id = "$node"
metrics_listen = "0.0.0.0:9464"

[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "tresor"
pin_file = "pin"

[database]
url = "$DB_URL"

[policy]
file = "policy.toml"
EOF
done

# Profiles for the tresor CLI on the host: node-a on localhost:8443, node-b on localhost:8444.
for who in officer officer2 service auditor; do
  for port in 8443 8444; do
    cat >"$who-$port.profile.toml" <<EOF
endpoint = "https://localhost:$port"
ca = "ca.pem"
server_name = "localhost"
cert = "$who.pem"
key = "$who.key"
EOF
  done
done

chmod 600 ./*.key pin pgpass pgpassword
chmod 644 ./*.pem ./*.toml softhsm2.conf
chown -R "$OWNER" "$CONFIG_DIR" "$TOKEN_DIR"
chown "$PG_OWNER" pgpassword
echo "compose-setup: wrote $CONFIG_DIR and the token in $TOKEN_DIR"
