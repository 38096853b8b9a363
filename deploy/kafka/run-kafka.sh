#!/usr/bin/env bash
# Apache Kafka (KRaft, one combined broker+controller) on loopback, for tests
# and development. No tarball, no Docker: the broker and its runtime
# dependencies are resolved from Maven Central with `mvn` (once; cached), the
# storage is formatted with a random cluster id, and `kafka.Kafka` runs on
# Java 17+ with a quiet log4j2 config.
#
#   deploy/kafka/run-kafka.sh [--port 9092]            # prints 127.0.0.1:9092 when ready
#   deploy/kafka/run-kafka.sh --resolve-only           # prints the classpath file
#
# Options:
#   --port N              client (PLAINTEXT) port on 127.0.0.1 (default 9092)
#   --controller-port N   KRaft controller port (default: a free port)
#   --data-dir DIR        log dirs + server.log (default: a temp dir, removed on exit)
#   --cluster-id ID       22-char base64url cluster id (default: random)
#   --set KEY=VALUE       extra server property (repeatable; last one wins)
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
# controlled shutdown) and the temp data dir is removed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${LIFTSTREAM_KAFKA_VERSION:-4.4.0}"
PORT=9092
CONTROLLER_PORT=""
DATA_DIR=""
CLUSTER_ID=""
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
    --set) [[ "$2" == *=* ]] || die "--set wants KEY=VALUE, got '$2'"; EXTRA+=("$2"); shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --exec) EXEC=1; shift ;;
    --resolve-only) RESOLVE_ONLY=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

[[ -n "$CONTROLLER_PORT" ]] || CONTROLLER_PORT="$(free_port)"
[[ -n "$CLUSTER_ID" ]] || CLUSTER_ID="$(random_cluster_id)"
TEMP_DATA=0
if [[ -z "$DATA_DIR" ]]; then
  [[ $EXEC == 1 ]] && die "--exec needs --data-dir (nobody would remove a temp dir)"
  DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/liftstream-kafka-XXXXXX")"
  TEMP_DATA=1
fi
mkdir -p "$DATA_DIR/logs" "$DATA_DIR/data"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"

PROPS="$DATA_DIR/server.properties"
sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
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
if ! "$JAVA" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m "${CDS_OPTS[@]}" "${LOG_OPTS[@]}" -cp "$CLASSPATH_STR" \
      kafka.tools.StorageTool format --cluster-id "$CLUSTER_ID" --config "$PROPS" --standalone \
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
