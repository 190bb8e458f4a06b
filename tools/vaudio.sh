#!/usr/bin/env bash
# vaudio.sh start|stop|status|env|echo-on VOLUME|echo-off — virtual audio devices on PulseAudio null sinks.
#   sink  spk      the virtual speaker; record it back from spk.monitor (ALSA: vspkmon)
#   sink  micsink  feed WAVs into it (paplay --device=micsink f.wav; ALSA: vmicfeed)
#   source micsink.monitor  the virtual microphone (default source; ALSA: vmic)
#   source quiet    silence at 48 kHz on the source's own clock, not a sink's monitor (ALSA: vquiet)
#   echo-on 60%  an echo path: what the speaker plays reaches the mic (module-loopback spk.monitor ->
#                micsink at that volume), the way a laptop's speaker reaches its own mic; echo-off removes it
# Clients need PULSE_SERVER and XDG_CONFIG_HOME from `vaudio.sh env` (set before PyAudio()).
set -euo pipefail
VA_DIR=${VA_DIR:-/tmp/realtalk-vaudio}; VA_RATE=${VA_RATE:-24000}
export PULSE_RUNTIME_PATH=$VA_DIR PULSE_SERVER=unix:$VA_DIR/native
export XDG_CONFIG_HOME=$VA_DIR/config
print_env() { echo "export PULSE_SERVER=$PULSE_SERVER XDG_CONFIG_HOME=$XDG_CONFIG_HOME"; }
start() {
  if pactl info >/dev/null 2>&1; then print_env; return 0; fi
  command -v pulseaudio >/dev/null || { echo "vaudio: pulseaudio is not installed; run: bash tools/setup-system.sh" >&2; exit 1; }
  mkdir -p "$VA_DIR" "$XDG_CONFIG_HOME/alsa"; chmod 700 "$VA_DIR"; rm -f "$VA_DIR/native" "$VA_DIR/pid"
  local ch="rate=$VA_RATE channels=1 format=s16le"
  pulseaudio -n --daemonize=yes --exit-idle-time=-1 --use-pid-file=yes --log-target="file:$VA_DIR/pulse.log" \
    -L "module-native-protocol-unix socket=$VA_DIR/native auth-anonymous=1" \
    -L "module-null-sink sink_name=spk $ch" -L "module-null-sink sink_name=micsink $ch" -L "module-null-sink sink_name=hole $ch" \
    -L "module-loopback source=spk.monitor sink=hole latency_msec=20 source_dont_move=1 sink_dont_move=1" \
    -L "module-loopback source=micsink.monitor sink=hole latency_msec=20 source_dont_move=1 sink_dont_move=1" \
    -L "module-null-source source_name=quiet rate=48000 channels=1 format=s16le" 2>>"$VA_DIR/start.log"
  for _ in $(seq 100); do pactl info >/dev/null 2>&1 && break; sleep 0.02; done
  for s in spk micsink; do pactl suspend-sink "$s" 1; pactl suspend-sink "$s" 0; done   # restart the 2 s render timers
  pactl set-default-sink spk; pactl set-default-source micsink.monitor
  cat > "$XDG_CONFIG_HOME/alsa/asoundrc" <<'RC'
pcm.vspk     { type pulse; device "spk";             hint { show on; description "virtual speaker" } }
pcm.vmic     { type pulse; device "micsink.monitor"; hint { show on; description "virtual mic" } }
pcm.vspkmon  { type pulse; device "spk.monitor";     hint { show on; description "speaker monitor" } }
pcm.vmicfeed { type pulse; device "micsink";         hint { show on; description "feed the virtual mic" } }
pcm.vquiet   { type pulse; device "quiet";           hint { show on; description "a silent source, on its own clock" } }
RC
  print_env; }
alive() { local _p _c st; read -r _p _c st _ < "/proc/$1/stat" 2>/dev/null || return 1; [ "$st" != Z ]; }
stop() { local pid; pid=$(cat "$VA_DIR/pid" 2>/dev/null || true)
  if [ -n "$pid" ] && alive "$pid"; then kill "$pid"; for _ in $(seq 100); do alive "$pid" || break; sleep 0.02; done
    if alive "$pid"; then kill -9 "$pid"; fi; echo "vaudio: stopped pid $pid"; else echo "vaudio: not running"; fi
  rm -f "$VA_DIR/native" "$VA_DIR/pid"; }
echo_on() { local module input
  module=$(pactl load-module module-loopback source=spk.monitor sink=micsink latency_msec=60 source_dont_move=1 sink_dont_move=1)
  input=$(pactl list sink-inputs | awk -v m="$module" '/^Sink Input #/ {i = substr($3, 2)} /Owner Module:/ && $3 == m {print i}')
  pactl set-sink-input-volume "$input" "${1:-60%}"; echo "$module" > "$VA_DIR/echo-module"; echo "$module"; }
echo_off() { local module; module=$(cat "$VA_DIR/echo-module" 2>/dev/null || true)
  if [ -n "$module" ]; then pactl unload-module "$module" || true; fi; rm -f "$VA_DIR/echo-module"; }
case "${1:-}" in start) start;; stop) stop;; env) print_env;; echo-on) echo_on "${2:-60%}";; echo-off) echo_off;;
  status) if pactl info >/dev/null 2>&1; then pactl list short sinks; pactl list short sources; else echo stopped; exit 1; fi;;
  *) echo "usage: $0 start|stop|status|env|echo-on VOLUME|echo-off" >&2; exit 2;; esac
