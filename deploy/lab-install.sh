#!/usr/bin/env bash
# lab-install.sh: turns a Linux machine into a tsotsa peer service, in one command, as often as you like.
#
#   sudo deploy/lab-install.sh --coordinator 192.168.1.10:7070 --announce-host 192.168.1.21 \
#       --token-file /root/swarm-token [--quant nf4 --device cuda --dtype bfloat16 --torch-index URL]
#   sudo deploy/lab-install.sh --uninstall
#
# What it installs, and nothing else (`--uninstall` removes exactly these):
#   /opt/tsotsa-peer/venv                       a venv with tsotsa from --source (default: this checkout),
#                                               torch==2.13.0 and every other package at constraints.txt's pins
#   /etc/tsotsa/peer.env                        the peer's settings (deploy/peer.env's keys), mode 0600: it
#                                               holds the swarm token
#   /etc/systemd/system/tsotsa-peer.service     deploy/tsotsa-peer.service, pointing at that venv and env file
# and, on a real install, the `tsotsa` system user the unit runs as (kept by --uninstall, with the peer's
# identity in /var/lib/tsotsa and its cached blocks in /var/cache/tsotsa).
#
# Why it is safe to run again: each file is written only when its content would change (a second run with
# the same flags changes nothing and says so); the env file is the place to edit settings by hand, and a
# rerun keeps those edits, changing only the values its flags name. The venv is rebuilt only when the
# source's files, pyproject.toml or constraints.txt changed. Files it did not write (no "Installed by
# deploy/lab-install.sh" line) are never overwritten or removed.
#
# `--root DIR` installs under DIR instead of / (every path above prefixed, the paths inside the files too)
# and never calls systemctl or useradd: for trying it out and for tests. `--venv PATH` reuses an environment
# that already has tsotsa installed instead of building one (it is then never removed).
set -euo pipefail

PROG=lab-install.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MARKER="# Installed by deploy/lab-install.sh"
TORCH_SPEC="torch==2.13.0"
UNIT_NAME=tsotsa-peer.service
# The env file's keys, in the order they are written, and the defaults of a first install.
KEYS=(TSOTSA_COORDINATOR TSOTSA_ANNOUNCE_HOST TSOTSA_HOST TSOTSA_PORT TSOTSA_DEVICE TSOTSA_QUANT TSOTSA_DTYPE
      TSOTSA_MODEL TSOTSA_EXTRA_ARGS TSOTSA_TOKEN TSOTSA_TLS_CERT TSOTSA_TLS_KEY TSOTSA_TLS_CA)
declare -A DEFAULTS=([TSOTSA_HOST]=0.0.0.0 [TSOTSA_PORT]=7080 [TSOTSA_DEVICE]=cpu [TSOTSA_QUANT]=none
                     [TSOTSA_DTYPE]=float32)

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

usage() {
    cat <<'EOF'
usage: lab-install.sh --coordinator HOST:PORT [options]     install or update this machine's peer service
       lab-install.sh --uninstall [--root DIR]              remove what lab-install.sh installed

peer settings (written to /etc/tsotsa/peer.env; on a rerun, only the values given here change):
  --coordinator HOST:PORT   the coordinator (required on the first install)
  --announce-host HOST      this machine's LAN address (required when listening on 0.0.0.0, the default)
  --host ADDR               address to listen on (default 0.0.0.0)
  --port PORT               gRPC port (default 7080)
  --device DEV              cpu or cuda[:N] (default cpu)
  --quant Q                 none, nf4 or int8 (default none)
  --dtype T                 float32, bfloat16 or float16 (default float32)
  --model PATH              a local copy of the checkpoint (default: fetch the blocks from the coordinator)
  --extra-args "ARGS"       any other `tsotsa-peer join` flags, e.g. "--num-blocks 8 --threads 4"
  --token-file FILE         read the swarm token from FILE (or set TSOTSA_TOKEN in the environment, or
  --token TOKEN             give it here, where `ps` shows it)
  --tls-cert F --tls-key F --tls-ca F    mutual TLS (tsotsa tls init/issue); all three or none
installation:
  --source DIR              the tsotsa checkout to install (default: the one this script is in)
  --venv PATH               reuse an environment that already has tsotsa (not built, never removed)
  --python PY               interpreter for a new venv (default python3.11)
  --torch-index URL         pip index for torch, e.g. https://download.pytorch.org/whl/cu128 on a GPU machine
  --user NAME               system user the service runs as (default tsotsa)
  --root DIR                install under DIR instead of /; no systemctl, no useradd
  --no-start                install, but do not enable or (re)start the service
EOF
}

# ---------------------------------------------------------------------------------------------- arguments

ROOT="" SOURCE="$(dirname "$SCRIPT_DIR")" VENV_GIVEN="" PYTHON=python3.11 TORCH_INDEX="" SERVICE_USER=tsotsa
UNINSTALL=0 NO_START=0 TOKEN_GIVEN=0
declare -A SET=()   # env-file values this run's flags give

# A value may be empty (--model "" clears it) but not another flag, except for --extra-args, whose value is flags.
need_value() { [[ $# -ge 2 && ( $1 == --extra-args || $2 != --* ) ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    arg=$1
    if [[ $arg == --*=* ]]; then set -- "${arg%%=*}" "${arg#*=}" "${@:2}"; arg=$1; fi
    case $arg in
        -h|--help) usage; exit 0 ;;
        --uninstall) UNINSTALL=1; shift; continue ;;
        --no-start) NO_START=1; shift; continue ;;
    esac
    need_value "$@"
    value=$2
    case $arg in
        --coordinator) SET[TSOTSA_COORDINATOR]=$value ;;
        --announce-host) SET[TSOTSA_ANNOUNCE_HOST]=$value ;;
        --host) SET[TSOTSA_HOST]=$value ;;
        --port) SET[TSOTSA_PORT]=$value ;;
        --device) SET[TSOTSA_DEVICE]=$value ;;
        --quant) SET[TSOTSA_QUANT]=$value ;;
        --dtype) SET[TSOTSA_DTYPE]=$value ;;
        --model) SET[TSOTSA_MODEL]=$value ;;
        --extra-args) SET[TSOTSA_EXTRA_ARGS]=$value ;;
        --token) SET[TSOTSA_TOKEN]=$value; TOKEN_GIVEN=1 ;;
        --token-file)
            [[ -r $value ]] || die "--token-file $value: no such readable file"
            SET[TSOTSA_TOKEN]=$(head -n 1 "$value"); TOKEN_GIVEN=1 ;;
        --tls-cert) SET[TSOTSA_TLS_CERT]=$value ;;
        --tls-key) SET[TSOTSA_TLS_KEY]=$value ;;
        --tls-ca) SET[TSOTSA_TLS_CA]=$value ;;
        --source) SOURCE=$value ;;
        --venv) VENV_GIVEN=$value ;;
        --python) PYTHON=$value ;;
        --torch-index) TORCH_INDEX=$value ;;
        --user) SERVICE_USER=$value ;;
        --root) ROOT=$value ;;
        *) die "unknown option $arg (see --help)" ;;
    esac
    shift 2
done

if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || ROOT=""
fi
SYSTEM=0   # 1: this is the machine's own /, and systemd runs it: systemctl is ours to call
if [[ -z $ROOT ]]; then
    [[ $EUID -eq 0 ]] || die "run as root (sudo), or give --root DIR to install under DIR"
    [[ -d /run/systemd/system ]] && SYSTEM=1
fi

ENV_DIR=$ROOT/etc/tsotsa
ENV_FILE=$ENV_DIR/peer.env
UNIT_DIR=$ROOT/etc/systemd/system
UNIT_FILE=$UNIT_DIR/$UNIT_NAME
PREFIX=$ROOT/opt/tsotsa-peer
DEFAULT_VENV=$PREFIX/venv
VENV_STAMP_NAME=.tsotsa-lab-install   # in a venv this script built; only such a venv is ever removed

sed_text() { printf '%s' "$1" | sed 's/[#&\\]/\\&/g'; }   # $1 as literal text in a s#...#...# replacement
[[ -f $SCRIPT_DIR/peer.env && -f $SCRIPT_DIR/tsotsa-peer.service ]] ||
    die "$SCRIPT_DIR: no peer.env and tsotsa-peer.service beside this script (run it from a tsotsa checkout)"
installed_by_us() { [[ -f $1 ]] && grep -qxF "$MARKER" "$1"; }

# -------------------------------------------------------------------------------------------- uninstall

systemctl_() { if [[ $SYSTEM -eq 1 ]]; then systemctl "$@"; fi; }

if [[ $UNINSTALL -eq 1 ]]; then
    [[ ${#SET[@]} -eq 0 ]] || die "--uninstall takes no peer settings"
    removed=0
    if installed_by_us "$UNIT_FILE"; then
        systemctl_ disable --now "$UNIT_NAME" || true
        rm -f "$UNIT_FILE"; systemctl_ daemon-reload
        say "removed $UNIT_FILE"; removed=1
    elif [[ -e $UNIT_FILE ]]; then
        say "kept $UNIT_FILE: lab-install.sh did not write it"
    fi
    if installed_by_us "$ENV_FILE"; then
        rm -f "$ENV_FILE"; say "removed $ENV_FILE"; removed=1
    elif [[ -e $ENV_FILE ]]; then
        say "kept $ENV_FILE: lab-install.sh did not write it"
    fi
    if [[ -f $DEFAULT_VENV/$VENV_STAMP_NAME ]]; then
        rm -rf "$DEFAULT_VENV"; say "removed $DEFAULT_VENV"; removed=1
    fi
    rmdir "$PREFIX" "$ENV_DIR" 2>/dev/null || true   # only if now empty
    if [[ -n $ROOT ]]; then   # and, under --root, the parents it may have made (a real / keeps them)
        rmdir "$UNIT_DIR" "$ROOT/etc/systemd" "$ROOT/etc" "$ROOT/opt" 2>/dev/null || true
    fi
    if [[ $removed -eq 0 ]]; then
        say "nothing to remove"
    else
        say "kept: the $SERVICE_USER user, the peer's identity in /var/lib/tsotsa and cached blocks in /var/cache/tsotsa"
    fi
    exit 0
fi

# ----------------------------------------------------------------------------------- checks of the values

if [[ $TOKEN_GIVEN -eq 0 && -n ${TSOTSA_TOKEN:-} ]]; then
    SET[TSOTSA_TOKEN]=$TSOTSA_TOKEN
fi
# systemd reads the env file, and the unit's shell word-splits TSOTSA_EXTRA_ARGS: quotes, backslashes, `$`
# and backticks would be interpreted by one or the other, so they are refused rather than mangled.
for key in "${!SET[@]}"; do
    value=${SET[$key]}
    [[ $value != *$'\n'* && $value != *[\"\'\\\$\`]* ]] ||
        die "the value for $key may not contain newlines, quotes, backslashes, \$ or backticks"
done
if [[ -n ${SET[TSOTSA_TOKEN]+x} && ${SET[TSOTSA_TOKEN]} == *[[:space:]]* ]]; then
    die "the swarm token may not contain whitespace"
fi

# The value a key has in the existing env file (empty when absent); `has_key` tells absent from empty.
file_value() { sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null | tail -n 1; }
has_key() { [[ -f $ENV_FILE ]] && grep -q "^$1=" "$ENV_FILE"; }
# The value after this run: the flag's, else the file's, else the default.
final_value() {
    if [[ -n ${SET[$1]+x} ]]; then echo "${SET[$1]}"
    elif has_key "$1"; then file_value "$1"
    else echo "${DEFAULTS[$1]:-}"; fi
}

if [[ -e $ENV_FILE ]] && ! installed_by_us "$ENV_FILE"; then
    die "$ENV_FILE exists and lab-install.sh did not write it; move it away first (its settings can be given as flags)"
fi
if [[ -e $UNIT_FILE ]] && ! installed_by_us "$UNIT_FILE"; then
    die "$UNIT_FILE exists and lab-install.sh did not write it; move it away first"
fi

coordinator=$(final_value TSOTSA_COORDINATOR)
[[ -n $coordinator ]] || die "no --coordinator HOST:PORT given (the coordinator's address, e.g. 192.168.1.10:7070)"
[[ $coordinator =~ ^[^[:space:]:]+:[0-9]+$ || $coordinator =~ ^\[[0-9a-fA-F:]+\]:[0-9]+$ ]] ||
    die "--coordinator $coordinator: expected HOST:PORT, e.g. 192.168.1.10:7070"
host=$(final_value TSOTSA_HOST)
if [[ ( $host == 0.0.0.0 || $host == :: ) && -z $(final_value TSOTSA_ANNOUNCE_HOST) ]]; then
    guess=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
    die "no --announce-host given: the address other machines reach this one at${guess:+ (this machine has $guess)}"
fi
port=$(final_value TSOTSA_PORT)
[[ $port =~ ^[0-9]+$ ]] || die "--port $port: expected a number"
device=$(final_value TSOTSA_DEVICE)
[[ $device =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || die "--device $device: expected cpu or cuda[:N]"
quant=$(final_value TSOTSA_QUANT)
[[ $quant =~ ^(none|nf4|int8)$ ]] || die "--quant $quant: expected none, nf4 or int8"
dtype=$(final_value TSOTSA_DTYPE)
[[ $dtype =~ ^(float32|bfloat16|float16)$ ]] || die "--dtype $dtype: expected float32, bfloat16 or float16"
tls_given=0
for key in TSOTSA_TLS_CERT TSOTSA_TLS_KEY TSOTSA_TLS_CA; do
    path=$(final_value $key)
    if [[ -n $path ]]; then
        tls_given=$((tls_given + 1))
        flag=${key#TSOTSA_}; flag=--${flag,,}
        [[ -f $path ]] || die "${flag//_/-} $path: no such file"   # the service reads it from this path
    fi
done
[[ $tls_given -eq 0 || $tls_given -eq 3 ]] ||
    die "TLS needs all three of --tls-cert, --tls-key and --tls-ca (tsotsa tls issue writes them)"
model=$(final_value TSOTSA_MODEL)
[[ -z $model || -f $model/config.json ]] || die "--model $model: no config.json there (not a checkpoint directory)"

# The unit's ExecStart is a shell command line and EnvironmentFile= a path systemd splits on spaces.
for path in "${VENV_GIVEN:-$DEFAULT_VENV}" "$ENV_FILE" "$SOURCE"; do
    [[ $path != *[[:space:]\"\'\\\$\`]* ]] || die "$path: paths with spaces or quotes cannot go into a systemd unit"
done
[[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user $SERVICE_USER: not a user name"

# ------------------------------------------------------------------------------------------------ the venv

venv_status=unchanged
peer_works() { "$1/bin/tsotsa-peer" --help >/dev/null 2>&1; }

# What gets installed from the source: its fingerprint decides whether the venv is rebuilt.
source_fingerprint() {
    (cd "$SOURCE" && find pyproject.toml constraints.txt tsotsa peer coordinator protos -type f \
        \( -name '*.py' -o -name '*.proto' -o -name '*.pyi' -o -name '*.toml' -o -name '*.txt' \) \
        -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

if [[ -n $VENV_GIVEN ]]; then
    VENV=$(cd "$VENV_GIVEN" 2>/dev/null && pwd) || die "--venv $VENV_GIVEN: no such directory"
    peer_works "$VENV" || die "--venv $VENV: $VENV/bin/tsotsa-peer --help does not run (is tsotsa installed there?)"
    venv_status="reused"
else
    VENV=$DEFAULT_VENV
    [[ -f $SOURCE/pyproject.toml && -f $SOURCE/constraints.txt ]] ||
        die "--source $SOURCE: not a tsotsa checkout (no pyproject.toml and constraints.txt)"
    fingerprint=$(source_fingerprint)
    if [[ -f $VENV/$VENV_STAMP_NAME && $(cat "$VENV/$VENV_STAMP_NAME") == "$fingerprint" ]] && peer_works "$VENV"; then
        venv_status=unchanged
    else
        command -v "$PYTHON" >/dev/null || die "no $PYTHON on this machine (give --python, 3.11 or later)"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
        say "building $VENV from $SOURCE (torch first, then tsotsa; a few minutes)"
        [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
        echo building > "$VENV/$VENV_STAMP_NAME"   # ours from now on: --uninstall removes even a failed build
        pip=("$VENV/bin/python" -m pip install -q)
        "${pip[@]}" --upgrade pip
        # As the Makefile does: torch first (from --torch-index if given: the CUDA build), then the project,
        # every package at the version constraints.txt pins.
        "${pip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} -c "$SOURCE/constraints.txt" "$TORCH_SPEC"
        "${pip[@]}" -c "$SOURCE/constraints.txt" "$SOURCE"
        peer_works "$VENV" || die "$VENV/bin/tsotsa-peer --help does not run after the install"
        echo "$fingerprint" > "$VENV/$VENV_STAMP_NAME"
        venv_status=built
    fi
fi

# ------------------------------------------------------------------------------------------ the env file

# The env file after this run: on a first install, deploy/peer.env's comments and keys (plus the TLS keys)
# with this run's values; after that, the existing file with only the lines of the keys this run's flags
# give rewritten (or appended), so the admin's comments, edits and other lines stay byte for byte.
render_env() {
    local text key value fresh=0
    if [[ -f $ENV_FILE ]]; then
        text=$(cat "$ENV_FILE"; echo x); text=${text%x}
    else
        fresh=1
        text="$MARKER
# $ENV_FILE: the settings of tsotsa-peer.service (deploy/README.md). Edit freely: rerunning
# lab-install.sh keeps your edits and changes only the values its flags give. Mode 0600: it holds the token.
$(grep -v '^# /etc/tsotsa/peer.env' "$SCRIPT_DIR/peer.env" | sed "s#/opt/tsotsa/.venv#$(sed_text "$VENV")#")

# Mutual TLS (tsotsa tls init / issue): this machine's certificate and key, and the lab CA; all three or none.
# The key must be readable by the $SERVICE_USER user.
"
    fi
    for key in "${KEYS[@]}"; do
        [[ $fresh -eq 1 || -n ${SET[$key]+x} ]] || continue
        value=$(final_value "$key")
        if grep -q "^$key=" <<<"$text"; then
            [[ $fresh -eq 1 || $(file_value "$key") != "$value" ]] || continue
            text=$(printf '%s' "$text" | KEY=$key VALUE=$value awk 'BEGIN { k = ENVIRON["KEY"] "=" }
                index($0, k) == 1 { print k ENVIRON["VALUE"]; next } { print }'; echo x)
            text=${text%x}
        else
            [[ -z $text || $text == *$'\n' ]] || text+=$'\n'
            text+="$key=$value"$'\n'
        fi
    done
    printf '%s' "$text"
}

# Writes $2 to $1 (mode $3) only if it differs; echoes new, updated or unchanged.
write_if_changed() {
    local path=$1 content=$2 mode=$3 tmp
    if [[ -f $path ]] && [[ $(cat "$path"; echo x) == "$content"x ]]; then
        [[ $(stat -c %a "$path") == "$mode" ]] || { chmod "$mode" "$path"; echo updated; return; }
        echo unchanged; return
    fi
    local status=new; [[ -e $path ]] && status=updated
    mkdir -p "$(dirname "$path")"
    tmp=$(mktemp "$path.XXXXXX")
    chmod "$mode" "$tmp"   # before the content: the token is never readable by others, not even briefly
    printf '%s' "$content" > "$tmp"
    mv -f "$tmp" "$path"
    echo "$status"
}

env_content=$(render_env; echo x); env_content=${env_content%x}
env_status=$(write_if_changed "$ENV_FILE" "$env_content" 600)
[[ -n $(final_value TSOTSA_TOKEN) ]] || say "warning: no swarm token (--token-file, or TSOTSA_TOKEN): an open swarm"

# ---------------------------------------------------------------------------------------------- the unit

# deploy/tsotsa-peer.service with this installation's paths: its venv, its env file, a working directory
# that exists whatever the source's location.
render_unit() {
    printf '%s\n# (from %s; rerun it to update, `lab-install.sh --uninstall` to remove)\n' "$MARKER" "$SOURCE"
    sed -e "s#/opt/tsotsa/.venv/bin/tsotsa-peer#$(sed_text "$VENV")/bin/tsotsa-peer#" \
        -e "s#^EnvironmentFile=.*#EnvironmentFile=$(sed_text "$ENV_FILE")#" \
        -e "s#^WorkingDirectory=.*#WorkingDirectory=$(sed_text "$(dirname "$VENV")")#" \
        -e "s#^User=.*#User=$(sed_text "$SERVICE_USER")#" -e "s#^Group=.*#Group=$(sed_text "$SERVICE_USER")#" \
        -e "s#^Documentation=.*#Documentation=file://$(sed_text "$SOURCE")/deploy/README.md#" \
        -e '/^# Install (as root/,/^#$/d' \
        "$SCRIPT_DIR/tsotsa-peer.service"
}
unit_content=$(render_unit; echo x); unit_content=${unit_content%x}
grep -qF "$VENV/bin/tsotsa-peer join" <<<"$unit_content" || die "$SCRIPT_DIR/tsotsa-peer.service: no ExecStart to adapt"
unit_status=$(write_if_changed "$UNIT_FILE" "$unit_content" 644)

# ------------------------------------------------------------------------------------ the user, systemctl

if [[ -z $ROOT ]] && ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/tsotsa --create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    say "created the system user $SERVICE_USER"
fi

say "venv $VENV: $venv_status"
say "env file $ENV_FILE: $env_status"
say "unit $UNIT_FILE: $unit_status"
if [[ $venv_status == unchanged || $venv_status == reused ]] && [[ $env_status == unchanged && $unit_status == unchanged ]]; then
    say "nothing changed"
    exit 0
fi
if [[ $SYSTEM -eq 1 ]]; then
    [[ $unit_status == unchanged ]] || systemctl daemon-reload
    if [[ $NO_START -eq 0 ]]; then
        systemctl enable "$UNIT_NAME" >/dev/null
        systemctl restart "$UNIT_NAME"
        say "started $UNIT_NAME; follow it with: journalctl -u tsotsa-peer -f"
    fi
elif [[ -n $ROOT ]]; then
    say "installed under $ROOT: systemctl not called"
else
    say "systemd is not running here: start the peer with $VENV/bin/tsotsa-peer join (settings in $ENV_FILE)"
fi
