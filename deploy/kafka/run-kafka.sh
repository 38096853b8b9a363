#!/usr/bin/env bash
# Apache Kafka (KRaft, combined broker+controller nodes) on loopback, for tests
# and development: one node by default, or one node of a multi-node cluster
# (--node-id, --voters; run the script once per node). No tarball, no Docker:
# the broker and its runtime dependencies are resolved from Maven Central with
# `mvn` (once; cached), the storage is formatted with a random cluster id, and
# `kafka.Kafka` runs on Java 17+ with a quiet log4j2 config.
#
#   deploy/kafka/run-kafka.sh [--port 9092]            # prints 127.0.0.1:9092 when ready
#   deploy/kafka/run-kafka.sh --resolve-only           # prints the classpath file
#   # a 3-node cluster: the same --cluster-id and --voters for every node
#   V=1@127.0.0.1:19093,2@127.0.0.1:29093,3@127.0.0.1:39093
#   deploy/kafka/run-kafka.sh --node-id 1 --voters $V --cluster-id $ID --port 19092 --data-dir d1 &
#   (likewise nodes 2 and 3; each waits for a quorum, so start them together)
#
# Options:
#   --port N              client (PLAINTEXT) port on 127.0.0.1 (default 9092)
#   --controller-port N   KRaft controller port (default: a free port)
#   --data-dir DIR        log dirs + server.log (default: a temp dir, removed on exit)
#   --cluster-id ID       22-char base64url cluster id (default: random)
#   --set KEY=VALUE       extra server property (repeatable; last one wins)
#   --node-id N           this node's node.id (default 1)
#   --voters SPEC         static KRaft quorum, ID@HOST:PORT,... (controller.quorum.voters;
#                         the storage is formatted without --standalone); this node's
#                         controller port defaults to its entry. Internal topics keep
#                         replication factor 1 unless --set overrides it.
#   --version V           Kafka version (default $LIFTSTREAM_KAFKA_VERSION or 4.4.0)
#   --exec                replace this shell by the JVM after formatting (the caller
#                         waits for readiness and stops the JVM itself; needs --data-dir)
#   --resolve-only        resolve (or find cached) jars, print the classpath file, exit
#   --timeout S           seconds to wait for "Kafka Server started" (default 120)
#
# Environment: LIFTSTREAM_KAFKA_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/liftstream),
# JAVA (default: java on PATH), KAFKA_HEAP_OPTS, KAFKA_JVM_OPTS, MVN (default mvn).
#
# The process stops on SIGTERM/SIGINT: the JVM gets SIGTERM (Kafka's own
# controlled shutdown) and the temp data dir is removed. A --data-dir that was
# formatted before is not formatted again: the node restarts on its log (a
# --cluster-id must then match the stored one).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${LIFTSTREAM_KAFKA_VERSION:-4.4.0}"
PORT=9092
CONTROLLER_PORT=""
DATA_DIR=""
CLUSTER_ID=""
NODE_ID=1
VOTERS=""
EXEC=0
RESOLVE_ONLY=0
TIMEOUT=120
EXTRA=()

die() { echo "run-kafka.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --controller-port) CONTROLLER_PORT="$2"; shift 2 ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --cluster-id) CLUSTER_ID="$2"; shift 2 ;;
    --node-id) [[ "$2" =~ ^[0-9]+$ ]] || die "--node-id wants a number, got '$2'"; NODE_ID="$2"; shift 2 ;;
    --voters) VOTERS="$2"; shift 2 ;;
    --set) [[ "$2" == *=* ]] || die "--set wants KEY=VALUE, got '$2'"; EXTRA+=("$2"); shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --exec) EXEC=1; shift ;;
    --resolve-only) RESOLVE_ONLY=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done

JAVA="${JAVA:-java}"
MVN="${MVN:-mvn}"
CACHE_ROOT="${LIFTSTREAM_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/liftstream}"
CACHE="$CACHE_ROOT/kafka-$VERSION"
CP_FILE="$CACHE/classpath"

# ------------------------------------------------------------------ resolve
resolve() {
  [[ -s "$CP_FILE" ]] && return 0
  command -v "$MVN" >/dev/null || die "no '$MVN' on PATH: Maven resolves Kafka $VERSION (apt-get install maven)"
  mkdir -p "$CACHE_ROOT"
  # One resolver at a time (parallel test sessions share the cache).
  exec 9>"$CACHE_ROOT/.kafka-$VERSION.lock"
  if command -v flock >/dev/null; then flock 9; fi
  [[ -s "$CP_FILE" ]] && return 0
  local tmp
  tmp="$(mktemp -d "$CACHE_ROOT/.kafka-$VERSION.XXXXXX")"
  echo "run-kafka.sh: resolving org.apache.kafka:kafka_2.13:$VERSION from Maven Central (once)..." >&2
  if ! "$MVN" -B -q -f "$HERE/pom.xml" \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -Dkafka.version="$VERSION" -DincludeScope=runtime \
        -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
    cat "$tmp/mvn.log" >&2
    rm -rf "$tmp"
    die "mvn could not resolve Kafka $VERSION"
  fi
  ls "$tmp/libs"/kafka_2.13-"$VERSION".jar >/dev/null 2>&1 || die "no kafka_2.13-$VERSION.jar resolved"
  rm -rf "$CACHE"
  mkdir -p "$CACHE"
  mv "$tmp/libs" "$CACHE/libs"
  rm -rf "$tmp"
  # Written last: its presence means the cache is complete.
  (cd "$CACHE/libs" && ls ./*.jar | sed "s|^\./|$CACHE/libs/|" | paste -sd: -) >"$CP_FILE.tmp"
  mv "$CP_FILE.tmp" "$CP_FILE"
}

resolve
exec 9>&-   # the lock (if taken) must not pass to the JVM
if [[ $RESOLVE_ONLY == 1 ]]; then
  echo "$CP_FILE"
  exit 0
fi

# --------------------------------------------------------------------- java
command -v "$JAVA" >/dev/null || die "no '$JAVA' on PATH (Kafka $VERSION needs Java 17+)"
JAVA_SETTINGS="$("$JAVA" -XshowSettings:properties -version 2>&1)"
java_prop() { sed -n "s/^ *$1 = //p" <<<"$JAVA_SETTINGS" | head -n1; }
JAVA_MAJOR="$(java_prop 'java\.specification\.version' | cut -d. -f1)"
[[ -n "$JAVA_MAJOR" && "$JAVA_MAJOR" -ge 17 ]] || die "Kafka $VERSION needs Java 17+, '$JAVA' is ${JAVA_MAJOR:-unknown}"

# Class-data sharing: the first run dumps the classes it loaded into an archive
# (at JVM exit: -XX:ArchiveClassesAtExit, to a per-process file that a later run
# adopts); later runs map it and start ~2x faster. One archive per Java build.
# LIFTSTREAM_KAFKA_CDS=0 turns it off. A stale or broken archive only costs a
# warning in logs/stdout.log (-Xshare:auto), never a failed start.
CDS_OPTS=()
if [[ "${LIFTSTREAM_KAFKA_CDS:-1}" != 0 ]]; then
  CDS_KEY="$(printf '%s|%s' "$(java_prop 'java\.runtime\.version')" "$(java_prop 'java\.home')" | cksum | cut -d' ' -f1)"
  CDS="$CACHE/cds-$CDS_KEY.jsa"
  if [[ ! -s "$CDS" ]]; then
    for f in "$CDS".*; do
      [[ -e "$f" ]] || continue
      kill -0 "${f##*.}" 2>/dev/null && continue   # that JVM still runs (or will dump)
      if [[ -s "$f" && ! -s "$CDS" ]]; then mv -f "$f" "$CDS"; else rm -f "$f"; fi
    done
  fi
  if [[ -s "$CDS" ]]; then
    CDS_OPTS=(-XX:SharedArchiveFile="$CDS")
  fi
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
random_cluster_id() {
  # Kafka's Uuid: 16 random bytes, base64url without padding; never starting
  # with '-' (it would read as a command-line option).
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && { echo "$id"; return; }
  done
}

if [[ -n "$VOTERS" ]]; then
  # ID@HOST:PORT,...; this node must be one of them (combined broker+controller)
  MINE=""
  IFS=, read -r -a VLIST <<<"$VOTERS"
  for v in "${VLIST[@]}"; do
    [[ "$v" =~ ^([0-9]+)@([^:@,]+):([0-9]+)$ ]] || die "--voters: '$v' is not ID@HOST:PORT"
    [[ "${BASH_REMATCH[1]}" == "$NODE_ID" ]] && MINE="${BASH_REMATCH[3]}"
  done
  [[ -n "$MINE" ]] || die "--voters has no entry for node $NODE_ID"
  [[ -z "$CONTROLLER_PORT" || "$CONTROLLER_PORT" == "$MINE" ]] || \
    die "--controller-port $CONTROLLER_PORT differs from node $NODE_ID's voter port $MINE"
  CONTROLLER_PORT="$MINE"
fi
[[ -n "$CONTROLLER_PORT" ]] || CONTROLLER_PORT="$(free_port)"
TEMP_DATA=0
if [[ -z "$DATA_DIR" ]]; then
  [[ $EXEC == 1 ]] && die "--exec needs --data-dir (nobody would remove a temp dir)"
  DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/liftstream-kafka-XXXXXX")"
  TEMP_DATA=1
fi
mkdir -p "$DATA_DIR/logs" "$DATA_DIR/data"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
FORMATTED=0
if [[ -s "$DATA_DIR/data/meta.properties" ]]; then
  # a restart of this node: keep its log and its cluster id
  FORMATTED=1
  STORED_ID="$(sed -n 's/^cluster\.id=//p' "$DATA_DIR/data/meta.properties")"
  [[ -z "$CLUSTER_ID" || "$CLUSTER_ID" == "$STORED_ID" ]] || \
    die "$DATA_DIR is formatted for cluster $STORED_ID, not $CLUSTER_ID"
  CLUSTER_ID="$STORED_ID"
fi
[[ -n "$CLUSTER_ID" ]] || CLUSTER_ID="$(random_cluster_id)"

PROPS="$DATA_DIR/server.properties"
QUORUM=(-e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g")
FORMAT_MODE=(--standalone)
if [[ -n "$VOTERS" ]]; then  # static quorum instead of the dynamic single voter
  QUORUM+=(-e "s|^controller\.quorum\.bootstrap\.servers=.*|controller.quorum.voters=$VOTERS|"
          -e "s|^# Dynamic quorum.*|# Static quorum (--voters): the storage is formatted without --standalone.|")
  FORMAT_MODE=()
fi
sed -e "s|@PORT@|$PORT|g" "${QUORUM[@]}" -e "s|@NODE_ID@|$NODE_ID|g" \
    -e "s|@LOG_DIRS@|$DATA_DIR/data|g" "$HERE/server.properties.template" >"$PROPS"
if [[ ${#EXTRA[@]} -gt 0 ]]; then
  printf '%s\n' "# --set overrides" "${EXTRA[@]}" >>"$PROPS"
fi

CLASSPATH_STR="$(cat "$CP_FILE")"
LOG_OPTS=(-Dlog4j2.configurationFile="$HERE/log4j2.properties" -Dkafka.logs.dir="$DATA_DIR/logs")
read -r -a HEAP <<<"${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
# C1 only (TieredStopAtLevel=1): starts ~1 s faster and leaves the CPU to the
# tests; plenty for a test broker. Production brokers use the image's defaults.
read -r -a JVM_OPTS <<<"${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}"

# Format: a short-lived JVM, so C1 only (starts faster).
if [[ $FORMATTED == 0 ]] && ! "$JAVA" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m "${CDS_OPTS[@]}" "${LOG_OPTS[@]}" -cp "$CLASSPATH_STR" \
      kafka.tools.StorageTool format --cluster-id "$CLUSTER_ID" --config "$PROPS" "${FORMAT_MODE[@]}" \
      >"$DATA_DIR/logs/format.log" 2>&1; then
  cat "$DATA_DIR/logs/format.log" >&2
  [[ $TEMP_DATA == 1 ]] && rm -rf "$DATA_DIR"
  die "kafka.tools.StorageTool format failed"
fi

SERVER=("$JAVA" "${HEAP[@]}" "${JVM_OPTS[@]}" "${LOG_OPTS[@]}" -cp "$CLASSPATH_STR" kafka.Kafka "$PROPS")
if [[ $EXEC == 1 ]]; then
  # After exec the JVM has this shell's pid.
  [[ -n "${CDS:-}" && ${#CDS_OPTS[@]} -eq 0 ]] && CDS_OPTS=(-XX:ArchiveClassesAtExit="$CDS.$$")
  exec "${SERVER[0]}" "${CDS_OPTS[@]}" "${SERVER[@]:1}" >>"$DATA_DIR/logs/stdout.log" 2>&1 </dev/null
fi

if [[ -n "${CDS:-}" && ${#CDS_OPTS[@]} -eq 0 ]]; then
  # The JVM's pid is not known before it starts: dump to a name of this shell's
  # pid, which stays alive until the JVM has exited.
  CDS_OPTS=(-XX:ArchiveClassesAtExit="$CDS.$$")
fi
"${SERVER[0]}" "${CDS_OPTS[@]}" "${SERVER[@]:1}" >>"$DATA_DIR/logs/stdout.log" 2>&1 </dev/null &
JPID=$!
stopping=0
cleanup() {
  if [[ $stopping == 0 ]]; then
    stopping=1
    kill -TERM "$JPID" 2>/dev/null || true
    wait "$JPID" 2>/dev/null || true
    [[ $TEMP_DATA == 1 ]] && rm -rf "$DATA_DIR"
  fi
}
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 130' INT
trap cleanup EXIT

deadline=$((SECONDS + TIMEOUT))
until grep -q "Kafka Server started" "$DATA_DIR/logs/server.log" 2>/dev/null; do
  if ! kill -0 "$JPID" 2>/dev/null; then
    tail -n 40 "$DATA_DIR/logs/server.log" "$DATA_DIR/logs/stdout.log" >&2 2>/dev/null || true
    die "Kafka exited during start-up"
  fi
  if [[ $SECONDS -ge $deadline ]]; then
    tail -n 40 "$DATA_DIR/logs/server.log" >&2 2>/dev/null || true
    die "Kafka not started after ${TIMEOUT}s"
  fi
  sleep 0.1
done
echo "127.0.0.1:$PORT"
[[ $TEMP_DATA == 1 ]] || echo "run-kafka.sh: logs in $DATA_DIR/logs" >&2
set +e
wait "$JPID"
rc=$?
stopping=1
[[ $TEMP_DATA == 1 ]] && rm -rf "$DATA_DIR"
exit $rc
